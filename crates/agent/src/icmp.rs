//! ICMP echo packets (RFC 792): encoding, checksum and reply parsing. Pure functions; the socket
//! side is in [`crate::net::ping`].

/// ICMP type of an echo request.
pub const ECHO_REQUEST: u8 = 8;
/// ICMP type of an echo reply.
pub const ECHO_REPLY: u8 = 0;
/// Header length of an echo message.
pub const HEADER_LEN: usize = 8;

/// The Internet checksum: one's complement of the one's complement sum of 16-bit words.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold above leaves a value that fits in 16 bits.
    !(sum as u16)
}

/// An echo request or reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    pub kind: u8,
    pub id: u16,
    pub seq: u16,
    pub payload: Vec<u8>,
}

impl Echo {
    /// Encodes the message with its checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut packet = Vec::with_capacity(HEADER_LEN + self.payload.len());
        packet.extend_from_slice(&[self.kind, 0, 0, 0]);
        packet.extend_from_slice(&self.id.to_be_bytes());
        packet.extend_from_slice(&self.seq.to_be_bytes());
        packet.extend_from_slice(&self.payload);
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        packet
    }

    /// Decodes an ICMP echo message (no IP header). `None` for other types, code != 0, short
    /// packets or a bad checksum.
    pub fn decode(packet: &[u8]) -> Option<Echo> {
        if packet.len() < HEADER_LEN || checksum(packet) != 0 {
            return None;
        }
        let kind = packet[0];
        if !(kind == ECHO_REQUEST || kind == ECHO_REPLY) || packet[1] != 0 {
            return None;
        }
        Some(Echo {
            kind,
            id: u16::from_be_bytes([packet[4], packet[5]]),
            seq: u16::from_be_bytes([packet[6], packet[7]]),
            payload: packet[HEADER_LEN..].to_vec(),
        })
    }
}

/// Strips the IPv4 header a raw ICMP socket delivers; returns the source address and the ICMP
/// message. `None` if the datagram is not a well-formed IPv4/ICMP packet.
pub fn strip_ipv4_header(datagram: &[u8]) -> Option<(std::net::Ipv4Addr, &[u8])> {
    let first = *datagram.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || datagram.len() < ihl || datagram[9] != 1 {
        return None;
    }
    let src = std::net::Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    Some((src, &datagram[ihl..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_known_vectors() {
        // RFC 1071 example: words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        assert_eq!(checksum(&[]), 0xffff);
        // Odd length pads with a zero byte.
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn echo_request_matches_a_captured_ping() {
        // `ping` with id 0x1234, seq 1, payload "abcd".
        let echo = Echo {
            kind: ECHO_REQUEST,
            id: 0x1234,
            seq: 1,
            payload: b"abcd".to_vec(),
        };
        let packet = echo.encode();
        assert_eq!(&packet[..2], &[8, 0]);
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0x00, 0x01]);
        // The checksum of a packet including its checksum is zero.
        assert_eq!(checksum(&packet), 0);
        // 0800 0000 1234 0001 6162 6364 -> sum 0x0800+0x1234+0x0001+0x6162+0x6364 = 0xdefb.
        assert_eq!(&packet[2..4], &(!0xdefbu16).to_be_bytes());
        assert_eq!(Echo::decode(&packet), Some(echo));
    }

    #[test]
    fn decode_rejects_corruption_and_other_types() {
        let mut packet = Echo {
            kind: ECHO_REPLY,
            id: 7,
            seq: 9,
            payload: vec![1, 2, 3],
        }
        .encode();
        assert!(Echo::decode(&packet).is_some());
        packet[8] ^= 0xff;
        assert_eq!(Echo::decode(&packet), None);
        assert_eq!(Echo::decode(&[0, 0, 0]), None);
        // Destination unreachable (type 3) with a valid checksum.
        let mut unreachable = vec![3, 1, 0, 0, 0, 0, 0, 0];
        let sum = checksum(&unreachable);
        unreachable[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(Echo::decode(&unreachable), None);
    }

    #[test]
    fn ipv4_header_is_stripped() {
        let reply = Echo {
            kind: ECHO_REPLY,
            id: 1,
            seq: 2,
            payload: vec![],
        }
        .encode();
        let mut datagram = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        datagram.extend_from_slice(&reply);
        let (src, icmp) = strip_ipv4_header(&datagram).unwrap();
        assert_eq!(src, std::net::Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(Echo::decode(icmp).unwrap().seq, 2);
        // IPv6 version nibble, truncated header, TCP protocol.
        datagram[0] = 0x65;
        assert!(strip_ipv4_header(&datagram).is_none());
        assert!(strip_ipv4_header(&[0x45, 0]).is_none());
        datagram[0] = 0x45;
        datagram[9] = 6;
        assert!(strip_ipv4_header(&datagram).is_none());
    }
}
