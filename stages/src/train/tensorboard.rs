//! TensorBoard event files for a training run: what `tensorboard --logdir`
//! (and its `EventAccumulator`, `tbparse`, ...) read. A file is a sequence
//! of TFRecords (length, masked CRC32C of the length, data, masked CRC32C of
//! the data), each holding an `Event` protocol buffer: first the file
//! version, then one scalar summary per value. Written by hand: the two
//! messages need six fields, not a protobuf code generator.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// One scalar: its tag (e.g. `train/loss`), step, wall time (seconds since
/// the epoch) and value.
pub(super) struct Scalar<'a> {
    pub tag: &'a str,
    pub step: usize,
    pub wall_time: f64,
    pub value: f64,
}

/// Write `scalars` as the event file `dir/events.out.tfevents.<start>.xlpipe`
/// (`start`: the run's first wall time, which TensorBoard reads from the name).
pub(super) fn write_events(dir: &Path, start: f64, scalars: &[Scalar]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("events.out.tfevents.{}.xlpipe", start as u64));
    let mut out = Vec::new();
    record(
        &mut out,
        &event(start, 0, Payload::FileVersion("brain.Event:2")),
    );
    for s in scalars {
        let value = Payload::Scalar {
            tag: s.tag,
            value: s.value as f32,
        };
        record(&mut out, &event(s.wall_time, s.step as i64, value));
    }
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&out))
        .with_context(|| format!("writing {}", path.display()))
}

enum Payload<'a> {
    FileVersion(&'a str),
    Scalar { tag: &'a str, value: f32 },
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3
/// (string) | summary = 5 (Summary { value = 1 (Value { tag = 1 (string),
/// simple_value = 2 (float) }) }) }`.
fn event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(1 << 3 | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3);
    varint(&mut e, step as u64);
    match payload {
        Payload::FileVersion(version) => bytes_field(&mut e, 3, version.as_bytes()),
        Payload::Scalar { tag, value } => {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(2 << 3 | 5);
            v.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            bytes_field(&mut summary, 1, &v);
            bytes_field(&mut e, 5, &summary);
        }
    }
    e
}

fn bytes_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push(field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn record(out: &mut Vec<u8>, data: &[u8]) {
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
}

/// TFRecord's checksum: CRC32C, rotated and offset ("masked") so that a
/// CRC of data holding CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), bit by bit: event files are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // The check value of CRC-32C (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn varints_as_protobuf_writes_them() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }
}
