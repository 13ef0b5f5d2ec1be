//! Which tensor of a GGUF file has a quantization rrt cannot read, and what that quantization is
//! called. candle refuses such a file while reading its header with only the type's number;
//! this walks the header again (metadata skipped, tensor infos read) to name the first tensor
//! whose type is not one rrt dequantizes, so the error says which tensor and which type.

use std::io::{Read, Seek};

/// ggml's name of type number `t` (`ggml_type` in ggml.h), or `None` for an unknown number.
pub fn ggml_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// The ggml type numbers rrt reads (candle's `GgmlDType`).
const READABLE: [u32; 15] = [0, 1, 30, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// The quantizations rrt reads (candle dequantizes them), for error messages.
pub const SUPPORTED: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// The first tensor of the GGUF header in `r` whose type rrt cannot read: its name and type
/// number. `None` when every type is readable or the header cannot be walked.
pub fn first_unsupported(r: &mut (impl Read + Seek)) -> Option<(String, u32)> {
    let mut h = Header { r, version: 0 };
    if h.u32()? != 0x4655_4747 {
        return None;
    }
    h.version = h.u32()?;
    let (tensors, kvs) = (h.count()?, h.count()?);
    for _ in 0..kvs {
        h.string()?;
        let t = h.u32()?;
        h.skip_value(t, 0)?;
    }
    for _ in 0..tensors {
        let name = h.string()?;
        let dims = h.u32()?;
        for _ in 0..dims {
            h.count()?;
        }
        let t = h.u32()?;
        h.u64()?;
        if !READABLE.contains(&t) {
            return Some((name, t));
        }
    }
    None
}

struct Header<'a, R> {
    r: &'a mut R,
    version: u32,
}

impl<R: Read + Seek> Header<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).ok()?;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    /// Counts and lengths: 32-bit in GGUF version 1, 64-bit after.
    fn count(&mut self) -> Option<u64> {
        if self.version == 1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    fn string(&mut self) -> Option<String> {
        let len = self.count()?;
        if len > 1 << 20 {
            return None;
        }
        let mut b = vec![0u8; len as usize];
        self.r.read_exact(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        self.r
            .seek(std::io::SeekFrom::Current(n as i64))
            .ok()
            .map(|_| ())
    }

    /// Skips a metadata value of type `t` (arrays of arrays to a bounded depth).
    fn skip_value(&mut self, t: u32, depth: usize) -> Option<()> {
        match t {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.string().map(|_| ()),
            9 if depth < 4 => {
                let item = self.u32()?;
                let n = self.count()?;
                match item {
                    0 | 1 | 7 => self.skip(n),
                    2 | 3 => self.skip(2 * n),
                    4..=6 => self.skip(4 * n),
                    10..=12 => self.skip(8 * n),
                    _ => (0..n).try_for_each(|_| self.skip_value(item, depth + 1)),
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A GGUF (metadata: a string, an array of strings, a u32) with tensors `a` (Q8_0) and `b`
    /// (F32), and `b`'s type number then patched to `t`.
    fn file_with_type(t: u32) -> Vec<u8> {
        let a = QTensor::quantize(
            &Tensor::ones((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let b = QTensor::quantize(
            &Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let list = gguf_file::Value::Array(vec![gguf_file::Value::String("x".into()); 3]);
        let n = gguf_file::Value::U32(7);
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut out,
            &[
                ("general.architecture", &arch),
                ("tokens", &list),
                ("n", &n),
            ],
            &[("a", &a), ("blk.0.b", &b)],
        )
        .unwrap();
        let mut bytes = out.into_inner();
        // `blk.0.b`'s info: name, 1 dim, the dim, then its type (F32 = 0) and offset.
        let name = b"blk.0.b";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8;
        assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 0);
        bytes[at..at + 4].copy_from_slice(&t.to_le_bytes());
        bytes
    }

    #[test]
    fn the_tensor_with_an_unreadable_type_is_named() {
        let bytes = file_with_type(23);
        assert_eq!(
            first_unsupported(&mut std::io::Cursor::new(&bytes)),
            Some(("blk.0.b".to_string(), 23))
        );
        assert_eq!(ggml_type_name(23), Some("IQ4_XS"));
        let fine = file_with_type(0);
        assert_eq!(first_unsupported(&mut std::io::Cursor::new(&fine)), None);
        // Opening such a file names the tensor and the type.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iq4.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let e = match crate::source::gguf::GgufSource::open(&path) {
            Ok(_) => panic!("an IQ4_XS tensor was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("blk.0.b") && e.contains("IQ4_XS") && e.contains("Q8_0"),
            "{e}"
        );
        // Garbage is not a header: no answer, no panic.
        assert_eq!(
            first_unsupported(&mut std::io::Cursor::new(b"GGUF\x03")),
            None
        );
    }
}
