//! Random valid messages of any request type (by protobuf reflection), random strings and
//! blobs with a bias towards hostile values, and damaging edits of encodings.

use protobuf::reflect::{
    EnumDescriptor, MessageDescriptor, ReflectValueBox, RuntimeFieldType, RuntimeType,
};
use protobuf::MessageDyn;

use super::rng::Rng;
use super::wire::put_varint;

pub const U32S: &[u32] = &[
    0,
    1,
    2,
    9,
    15,
    64,
    65,
    255,
    1000,
    4096,
    65_535,
    65_536,
    1 << 20,
    (1 << 20) + 1,
    i32::MAX as u32,
    u32::MAX - 1,
    u32::MAX,
];
pub const U64S: &[u64] = &[
    0,
    1,
    4096,
    16 << 20,
    (16 << 20) + 1,
    1 << 32,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];
pub const I64S: &[i64] = &[
    0,
    1,
    -1,
    i32::MIN as i64,
    i32::MAX as i64,
    i64::MIN,
    i64::MAX,
];

pub const STRINGS: &[&str] = &[
    "",
    "a",
    "c1",
    "fuzz",
    ".",
    "..",
    "/",
    "//",
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    "files/../../x",
    "\0",
    "a\0b",
    "-rf",
    "--help",
    "*",
    "%s%s%n",
    "\n",
    "a\nnameserver 6.6.6.6",
    "lo",
    "fuzz0",
    "127.0.0.1",
    "0.0.0.0/0",
    "10.0.0.1/33",
    "255.255.255.255",
    "1.2.3",
    "::1",
    "aa:bb:cc:dd:ee:ff",
    "zz:zz:zz:zz:zz:zz",
    "/dev/vdb",
    "/dev/vda1",
    "/dev/../etc/passwd",
    "scratch",
    "kernel.shm_rmid_forced",
    "kernel.hostname",
    "kernel/shm_rmid_forced",
    "../../proc/sys/kernel/hostname",
    "net.ipv4.ip_forward",
    "ext4",
    "tmpfs",
    "proc",
    "SERVING",
];

pub const JSONS: &[&[u8]] = &[
    b"",
    b"{}",
    b"null",
    b"[]",
    b"\"",
    b"{",
    b"{\"args\":[]}",
    b"{\"args\":\"sh\"}",
    b"{\"args\":[\"/bin/true\"],\"user\":{\"uid\":-1}}",
    b"{\"ociVersion\":\"1.0.2\",\"process\":{\"args\":[\"/bin/true\"],\"cwd\":\"/\"}}",
    b"{\"memory\":{\"limit\":-1}}",
    b"{\"cpu\":{\"shares\":18446744073709551615}}",
    b"{\"pids\":{\"limit\":\"many\"}}",
];

pub fn random_string(rng: &mut Rng) -> String {
    match rng.below(8) {
        0..=3 => (*rng.pick(STRINGS)).to_owned(),
        4 => "x".repeat(*rng.pick(&[63, 64, 65, 128, 129, 255, 256, 4096, 10_240])),
        5 => (0..rng.below(40))
            .map(|_| char::from(b' ' + rng.below(95) as u8))
            .collect(),
        6 => (0..rng.below(20))
            .filter_map(|_| char::from_u32(rng.next_u64() as u32 % 0x11_0000))
            .collect(),
        _ => format!("{}/{}", rng.pick(STRINGS), rng.pick(STRINGS)),
    }
}

pub fn nested_json(depth: usize) -> Vec<u8> {
    let mut v = vec![b'['; depth];
    v.extend(std::iter::repeat_n(b']', depth));
    v
}

pub fn random_blob(rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0..=3 => rng.pick(JSONS).to_vec(),
        4 => nested_json(*rng.pick(&[127, 129, 10_000])),
        5 if rng.one_in(8) => vec![b'a'; protocol::MAX_COPY_FILE_CHUNK + 1],
        _ => {
            let len = rng.size();
            rng.bytes(len)
        }
    }
}

pub fn random_enum(rng: &mut Rng, e: &EnumDescriptor) -> i32 {
    if rng.one_in(4) {
        *rng.pick(&[-1, 3, 99, i32::MAX, i32::MIN])
    } else {
        let values: Vec<i32> = e.values().map(|v| v.value()).collect();
        *rng.pick(&values)
    }
}

pub fn random_value(rng: &mut Rng, ty: &RuntimeType, depth: u32) -> ReflectValueBox {
    let small = rng.one_in(2);
    match ty {
        RuntimeType::U32 => ReflectValueBox::U32(if small {
            *rng.pick(U32S)
        } else {
            rng.next_u64() as u32
        }),
        RuntimeType::U64 => ReflectValueBox::U64(if small {
            *rng.pick(U64S)
        } else {
            rng.next_u64()
        }),
        RuntimeType::I32 => ReflectValueBox::I32(*rng.pick(I64S) as i32),
        RuntimeType::I64 => ReflectValueBox::I64(*rng.pick(I64S)),
        RuntimeType::F32 => ReflectValueBox::F32(f32::from_bits(rng.next_u64() as u32)),
        RuntimeType::F64 => ReflectValueBox::F64(f64::from_bits(rng.next_u64())),
        RuntimeType::Bool => ReflectValueBox::Bool(small),
        RuntimeType::String => ReflectValueBox::String(random_string(rng)),
        RuntimeType::VecU8 => ReflectValueBox::Bytes(random_blob(rng)),
        RuntimeType::Enum(e) => ReflectValueBox::Enum(e.clone(), random_enum(rng, e)),
        RuntimeType::Message(m) => ReflectValueBox::Message(random_message(rng, m, depth + 1)),
    }
}

/// A valid message of type `desc` with random field values (each field set with probability
/// 2/3; repeated and map fields get 0-3 entries).
pub fn random_message(rng: &mut Rng, desc: &MessageDescriptor, depth: u32) -> Box<dyn MessageDyn> {
    let mut msg = desc.new_instance();
    if depth > 3 {
        return msg;
    }
    for field in desc.fields() {
        if rng.one_in(3) {
            continue;
        }
        match field.runtime_field_type() {
            RuntimeFieldType::Singular(ty) => {
                let value = random_value(rng, &ty, depth);
                field.set_singular_field(&mut *msg, value);
            }
            RuntimeFieldType::Repeated(ty) => {
                for _ in 0..rng.below(4) {
                    let value = random_value(rng, &ty, depth);
                    field.mut_repeated(&mut *msg).push(value);
                }
            }
            RuntimeFieldType::Map(kt, vt) => {
                for _ in 0..rng.below(4) {
                    let (k, v) = (random_value(rng, &kt, depth), random_value(rng, &vt, depth));
                    field.mut_map(&mut *msg).insert(k, v);
                }
            }
        }
    }
    msg
}

/// 1-3 damaging edits of a (valid) encoding.
pub fn mutate(rng: &mut Rng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(3) {
        let at = rng.below(data.len() + 1);
        match rng.below(10) {
            0 => data.truncate(at),
            1 => {
                for _ in 0..=rng.below(4) {
                    if !data.is_empty() {
                        let i = rng.below(data.len());
                        data[i] ^= 1 << rng.below(8);
                    }
                }
            }
            2 => {
                let len = rng.below(8) + 1;
                let junk = rng.bytes(len);
                data.splice(at..at, junk);
            }
            3 => {
                let end = (at + rng.below(8) + 1).min(data.len());
                data.drain(at..end);
            }
            4 => {
                if at < data.len() {
                    data[at] = *rng.pick(&[0x00, 0x80, 0xff, 0x7f]);
                }
            }
            // A field with a random key and a few junk bytes.
            5 => {
                put_varint(&mut data, rng.next_u64() % (1 << 20));
                let len = rng.below(6);
                data.extend(rng.bytes(len));
            }
            // An 11-byte varint (protobuf allows 10).
            6 => {
                put_varint(&mut data, (rng.below(9) as u64 + 1) << 3);
                data.extend_from_slice(&[0x80; 10]);
                data.push(0x01);
            }
            // A length-delimited field declaring 4 GiB.
            7 => {
                put_varint(&mut data, (rng.below(9) as u64 + 1) << 3 | 2);
                data.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
            // The same fields twice: valid, the later values win.
            8 => {
                let copy = data.clone();
                data.extend(copy);
            }
            // A string field that is not UTF-8.
            _ => {
                put_varint(&mut data, (rng.below(9) as u64 + 1) << 3 | 2);
                data.extend_from_slice(&[2, 0xc3, 0x28]);
            }
        }
    }
    data
}
