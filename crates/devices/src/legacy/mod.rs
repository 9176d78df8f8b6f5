//! Legacy PC devices: 8250 serial and the i8042 controller (used for the guest's reset path).
