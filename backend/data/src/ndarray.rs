//! A minimal n-dimensional array as stored in `.npy` files and numpy pickles: a dtype, a
//! shape and C-ordered little-endian bytes (or Python objects for `dtype=object`).

use crate::error::{DataError, Result};
use crate::pickle::Value;

/// A numpy dtype restricted to what datasets use: bool, ints, floats, fixed strings, objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DType {
    /// numpy kind character: 'b', 'u', 'i', 'f', 'U', 'S' or 'O'.
    pub kind: char,
    /// Bytes per element (for 'U', four per character).
    pub size: usize,
    /// Stored big-endian (the array's bytes are converted to little-endian on load).
    pub big_endian: bool,
}

impl DType {
    /// uint8.
    pub const U8: DType = DType {
        kind: 'u',
        size: 1,
        big_endian: false,
    };
    /// float64.
    pub const F64: DType = DType {
        kind: 'f',
        size: 8,
        big_endian: false,
    };
    /// float32.
    pub const F32: DType = DType {
        kind: 'f',
        size: 4,
        big_endian: false,
    };
    /// bool.
    pub const BOOL: DType = DType {
        kind: 'b',
        size: 1,
        big_endian: false,
    };

    /// Parse a numpy type string such as "<f8", "|u1", "<U12", "b1", "f", "O", "uint8".
    pub fn parse(descr: &str) -> Result<DType> {
        let bad = || DataError::Npy(format!("unsupported dtype {descr:?}"));
        let named = match descr {
            "bool" | "?" => Some("|b1"),
            "uint8" | "B" => Some("|u1"),
            "int8" => Some("|i1"),
            "int16" => Some("<i2"),
            "int32" => Some("<i4"),
            "int64" | "int" => Some("<i8"),
            "float16" => Some("<f2"),
            "float32" | "f" => Some("<f4"),
            "float64" | "float" | "d" => Some("<f8"),
            "object" => Some("|O"),
            _ => None,
        };
        let d = named.unwrap_or(descr);
        let (big_endian, rest) = match d.chars().next() {
            Some('>') | Some('!') => (true, &d[1..]),
            Some('<') | Some('|') | Some('=') => (false, &d[1..]),
            _ => (false, d),
        };
        let mut chars = rest.chars();
        let kind = chars.next().ok_or_else(bad)?;
        let num: String = chars.collect();
        let n: usize = if num.is_empty() {
            match kind {
                'O' => 8,
                'b' | '?' => 1,
                'U' | 'S' => 0,
                _ => return Err(bad()),
            }
        } else {
            num.parse().map_err(|_| bad())?
        };
        let (kind, size) = match kind {
            '?' => ('b', 1),
            'U' => ('U', n * 4),
            'b' | 'u' | 'i' | 'f' | 'S' | 'O' => (kind, n),
            _ => return Err(bad()),
        };
        if matches!(kind, 'f') && ![2, 4, 8].contains(&size)
            || matches!(kind, 'u' | 'i') && ![1, 2, 4, 8].contains(&size)
        {
            return Err(bad());
        }
        Ok(DType {
            kind,
            size,
            big_endian,
        })
    }

    /// The numpy type string, e.g. "<f8", "|u1", "<U5".
    pub fn descr(&self) -> String {
        let order = if self.size <= 1 && self.kind != 'U' || matches!(self.kind, 'S' | 'O') {
            '|'
        } else {
            '<'
        };
        match self.kind {
            'U' => format!("<U{}", self.size / 4),
            'O' => "|O".to_string(),
            k => format!("{order}{k}{}", self.size),
        }
    }
}

/// The elements of an array.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    /// C-ordered little-endian element bytes.
    Raw(Vec<u8>),
    /// Python objects of a `dtype=object` array, C order.
    Objects(Vec<Value>),
}

/// An n-dimensional array in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// Element type (always little-endian after loading).
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: ArrayData,
}

fn c_from_fortran(bytes: &[u8], shape: &[usize], item: usize) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let mut out = vec![0u8; n * item];
    let mut idx = vec![0usize; shape.len()];
    for c in 0..n {
        // Fortran offset of the C-order multi-index.
        let mut f = 0;
        let mut stride = 1;
        for (d, &i) in idx.iter().enumerate() {
            f += i * stride;
            stride *= shape[d];
        }
        out[c * item..(c + 1) * item].copy_from_slice(&bytes[f * item..(f + 1) * item]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

impl NdArray {
    /// Build from raw element bytes in the given order; converts to C order, little-endian.
    pub fn from_raw(
        dtype: DType,
        shape: Vec<usize>,
        fortran: bool,
        bytes: &[u8],
    ) -> Result<NdArray> {
        if dtype.kind == 'O' {
            return Err(DataError::Npy("object arrays need pickled elements".into()));
        }
        let n: usize = shape.iter().product();
        if bytes.len() < n * dtype.size {
            return Err(DataError::Npy(format!(
                "{} bytes for {n} elements of {}",
                bytes.len(),
                dtype.descr()
            )));
        }
        let bytes = &bytes[..n * dtype.size];
        let mut data = if fortran && shape.len() > 1 {
            c_from_fortran(bytes, &shape, dtype.size)
        } else {
            bytes.to_vec()
        };
        let mut dtype = dtype;
        if dtype.big_endian {
            let unit = if dtype.kind == 'U' {
                4
            } else if dtype.kind == 'S' {
                1
            } else {
                dtype.size
            };
            for chunk in data.chunks_mut(unit) {
                chunk.reverse();
            }
            dtype.big_endian = false;
        }
        Ok(NdArray {
            dtype,
            shape,
            data: ArrayData::Raw(data),
        })
    }

    /// A uint8 array.
    pub fn from_u8(shape: Vec<usize>, data: Vec<u8>) -> NdArray {
        NdArray {
            dtype: DType::U8,
            shape,
            data: ArrayData::Raw(data),
        }
    }

    /// A float64 array.
    pub fn from_f64(shape: Vec<usize>, data: &[f64]) -> NdArray {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        NdArray {
            dtype: DType::F64,
            shape,
            data: ArrayData::Raw(raw),
        }
    }

    /// A one-dimensional unicode array ("<U{longest}") of the strings.
    pub fn from_strings(items: &[String]) -> NdArray {
        let width = items
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut raw = Vec::with_capacity(items.len() * width * 4);
        for s in items {
            let mut k = 0;
            for ch in s.chars() {
                raw.extend_from_slice(&(ch as u32).to_le_bytes());
                k += 1;
            }
            raw.resize(raw.len() + (width - k) * 4, 0);
        }
        NdArray {
            dtype: DType {
                kind: 'U',
                size: width * 4,
                big_endian: false,
            },
            shape: vec![items.len()],
            data: ArrayData::Raw(raw),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn raw(&self) -> Result<&[u8]> {
        match &self.data {
            ArrayData::Raw(r) => Ok(r),
            ArrayData::Objects(_) => Err(DataError::Npy(
                "object array where numbers were expected".into(),
            )),
        }
    }

    /// Elements as f64 (bool, integer and float dtypes; object arrays of numbers).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        if let ArrayData::Objects(items) = &self.data {
            return items
                .iter()
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| DataError::Npy("non-numeric object element".into()))
                })
                .collect();
        }
        let raw = self.raw()?;
        let s = self.dtype.size;
        let f = |c: &[u8]| -> f64 {
            match (self.dtype.kind, s) {
                ('b', _) | ('u', 1) => c[0] as f64,
                ('i', 1) => c[0] as i8 as f64,
                ('u', 2) => u16::from_le_bytes([c[0], c[1]]) as f64,
                ('i', 2) => i16::from_le_bytes([c[0], c[1]]) as f64,
                ('u', 4) => u32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                ('i', 4) => i32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                ('u', 8) => u64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                ('i', 8) => i64::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                ('f', 2) => half_to_f64(u16::from_le_bytes([c[0], c[1]])),
                ('f', 4) => f32::from_le_bytes(c.try_into().unwrap_or_default()) as f64,
                ('f', 8) => f64::from_le_bytes(c.try_into().unwrap_or_default()),
                _ => f64::NAN,
            }
        };
        if matches!(self.dtype.kind, 'U' | 'S') {
            return Err(DataError::Npy(
                "string array where numbers were expected".into(),
            ));
        }
        Ok(raw.chunks(s).map(f).collect())
    }

    /// Elements as strings ('U' and 'S' dtypes, or object arrays of str).
    pub fn to_strings(&self) -> Result<Vec<String>> {
        match (&self.data, self.dtype.kind) {
            (ArrayData::Objects(items), _) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| DataError::Npy("non-string object element".into()))
                })
                .collect(),
            (ArrayData::Raw(raw), 'U') => Ok(raw
                .chunks(self.dtype.size.max(4))
                .map(|c| {
                    c.chunks(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .take_while(|&u| u != 0)
                        .filter_map(char::from_u32)
                        .collect()
                })
                .collect()),
            (ArrayData::Raw(raw), 'S') => Ok(raw
                .chunks(self.dtype.size.max(1))
                .map(|c| {
                    String::from_utf8_lossy(c.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
                })
                .collect()),
            _ => Err(DataError::Npy(format!(
                "{} array where strings were expected",
                self.dtype.descr()
            ))),
        }
    }

    /// Element bytes of a uint8/bool array without conversion.
    pub fn as_u8(&self) -> Option<&[u8]> {
        match (&self.data, self.dtype.kind, self.dtype.size) {
            (ArrayData::Raw(r), 'u' | 'b', 1) => Some(r),
            _ => None,
        }
    }
}

fn half_to_f64(h: u16) -> f64 {
    let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 => {
            if frac == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_roundtrip() {
        for d in ["<f8", "|u1", "<U7", "|b1", "<i4", "|S3", "|O", "<f2"] {
            assert_eq!(DType::parse(d).unwrap().descr(), d);
        }
        assert!(DType::parse(">i2").unwrap().big_endian);
        assert!(DType::parse("<c16").is_err());
    }

    #[test]
    fn fortran_and_big_endian() {
        // 2x3 array [[1,2,3],[4,5,6]] stored Fortran-ordered big-endian int16.
        let f: Vec<u8> = [1i16, 4, 2, 5, 3, 6]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let a = NdArray::from_raw(DType::parse(">i2").unwrap(), vec![2, 3], true, &f).unwrap();
        assert_eq!(a.to_f64().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let s = NdArray::from_strings(&["ab".into(), "Fred".into(), "".into()]);
        assert_eq!(s.to_strings().unwrap(), vec!["ab", "Fred", ""]);
        assert_eq!(half_to_f64(0x3c00), 1.0);
    }
}
