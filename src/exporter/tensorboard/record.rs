//! TFRecord framing and the masked CRC-32C that TensorBoard event files use.
//!
//! This module owns the byte layout of one record and nothing else: which
//! protobuf goes inside a record is `encoder`'s business, and files, flushing
//! and naming belong to the writer. The layout follows TensorBoard's
//! `tensorboard/summary/writer/record_writer.py` (`RecordWriter.write`) and
//! `tensorboard/data/server/tf_record.rs` (which quotes TensorFlow's
//! `core/lib/io/record_writer.cc`); the checksum follows
//! `tensorboard/data/server/masked_crc.rs`.
//!
//! One record, all integers little-endian, 16 bytes of overhead:
//!
//! ```text
//! u64  length                          length of `data` in bytes
//! u32  masked_crc32c(length bytes)     CRC over the 8 length bytes as written
//! u8   data[length]                    one serialized `Event`
//! u32  masked_crc32c(data)
//! ```
//!
//! Records are simply concatenated: there is no file header, footer, padding or
//! index. Readers treat a half-written trailing record as "not there yet", so a
//! writer must only ever append whole records and never rewrite earlier bytes.

/// Constant added after rotating the CRC (the LevelDB / TFRecord mask).
const MASK_DELTA: u32 = 0xa282_ead8;

/// Bytes a record adds around its payload: length, length CRC and data CRC.
const RECORD_OVERHEAD: usize = 8 + 4 + 4;

/// Returns the masked CRC-32C (Castagnoli) of `data`, as stored in TFRecords.
///
/// The CRC is plain CRC-32C (the `crc32c` crate); the mask is
/// `((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8)`, which keeps a CRC of
/// data that itself contains CRCs from being trivially predictable.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    // `rotate_right(15)` is `(crc >> 15) | (crc << 17)`.
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(MASK_DELTA)
}

/// Appends `data` to `out` as one framed TFRecord.
///
/// Writes the payload length as a little-endian `u64`, the masked CRC of those
/// eight bytes, the payload itself and the masked CRC of the payload, so `out`
/// grows by `data.len() + 16` bytes. Existing bytes in `out` are never touched,
/// which lets a caller batch several records into one buffer and write it with a
/// single `write_all`.
pub fn append_record(out: &mut Vec<u8>, data: &[u8]) {
    append_record_with(out, data.len(), |out| out.extend_from_slice(data));
}

/// Appends one TFRecord of `len` data bytes that `write` appends to `out`, so a record can be
/// encoded in place instead of through a copy. `write` must append exactly `len` bytes (checked:
/// a shorter or longer write would corrupt the file, so it panics, a bug of ours, not input).
pub fn append_record_with(out: &mut Vec<u8>, len: usize, write: impl FnOnce(&mut Vec<u8>)) {
    let length = (len as u64).to_le_bytes();
    out.reserve(len + RECORD_OVERHEAD);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    let start = out.len();
    write(out);
    assert_eq!(out.len() - start, len, "a TFRecord's data must be the length its header says");
    let crc = masked_crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn crc32c_of_32_zero_bytes_matches_rfc_3720() {
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn masked_crc_of_real_event_file_bytes() {
        assert_eq!(masked_crc32c(b"\x1a\x11CRC test, one two"), 0x5794_d08a);
    }

    #[test]
    fn masked_crc_of_length_24() {
        assert_eq!(masked_crc32c(&24u64.to_le_bytes()), 0x224b_7fa3);
    }

    #[test]
    fn masked_crc_of_length_0() {
        assert_eq!(masked_crc32c(&0u64.to_le_bytes()), 0x0798_0329);
    }

    #[test]
    fn masked_crc_of_empty_input_is_the_mask_delta() {
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    /// The complete record from the tests of `tensorboard/data/server/tf_record.rs`:
    /// an `Event { wall_time: 1567808404.0, file_version: "brain.Event:2" }`.
    #[test]
    fn frames_the_tf_record_rs_example_exactly() {
        let mut data = vec![
            0x09, 0x00, 0x00, 0x80, 0x38, 0x99, 0xd6, 0xd7, 0x41, 0x1a, 0x0d,
        ];
        data.extend_from_slice(b"brain.Event:2");
        assert_eq!(data.len(), 24);

        let mut expected = vec![0x18, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0x7f, 0x4b, 0x22];
        expected.extend_from_slice(&data);
        expected.extend_from_slice(&[0x12, 0x4b, 0x36, 0xab]);

        let mut out = Vec::new();
        append_record(&mut out, &data);
        assert_eq!(out, expected);
    }

    #[test]
    fn appends_without_touching_earlier_bytes() {
        let mut out = b"prefix".to_vec();
        append_record(&mut out, b"");
        append_record(&mut out, b"abc");
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(out.len(), 6 + 16 + (3 + 16));
        // Empty record: zero length, its CRC, then the CRC of nothing.
        assert_eq!(&out[6..14], &0u64.to_le_bytes());
        assert_eq!(&out[14..18], &0x0798_0329u32.to_le_bytes());
        assert_eq!(&out[18..22], &0xa282_ead8u32.to_le_bytes());
        // Second record's payload and trailing CRC.
        assert_eq!(&out[22..30], &3u64.to_le_bytes());
        assert_eq!(&out[34..37], b"abc");
        assert_eq!(&out[37..41], &masked_crc32c(b"abc").to_le_bytes());
    }
}
