//! Reading and writing numpy `.npy` files (format versions 1.0, 2.0 and 3.0; C or Fortran
//! order; bool, integer, float and fixed-string dtypes). Writes version 1.0, C order.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::ndarray::{ArrayData, DType, NdArray};

const MAGIC: &[u8] = b"\x93NUMPY";

fn header_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let pat_a = format!("'{key}'");
    let pat_b = format!("\"{key}\"");
    let at = header
        .find(&pat_a)
        .map(|i| i + pat_a.len())
        .or_else(|| header.find(&pat_b).map(|i| i + pat_b.len()))
        .ok_or_else(|| DataError::Npy(format!("header lacks {key}: {header}")))?;
    let rest = header[at..]
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(|| DataError::Npy("bad header".into()))?;
    Ok(rest.trim_start())
}

/// Parse an .npy file's bytes.
pub fn parse_npy(bytes: &[u8]) -> Result<NdArray> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(DataError::Npy("not an .npy file (bad magic)".into()));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(DataError::Npy("truncated header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(DataError::Npy(format!("unsupported format version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| DataError::Npy("truncated header".into()))?;
    let header =
        std::str::from_utf8(header).map_err(|_| DataError::Npy("header is not text".into()))?;
    let descr = header_value(header, "descr")?;
    let quote = descr
        .chars()
        .next()
        .ok_or_else(|| DataError::Npy("empty descr".into()))?;
    if quote != '\'' && quote != '"' {
        return Err(DataError::Npy(format!(
            "structured dtypes are not supported: {descr}"
        )));
    }
    let descr = &descr[1..descr[1..].find(quote).map(|i| i + 1).unwrap_or(1)];
    let dtype = DType::parse(descr)?;
    let fortran = header_value(header, "fortran_order")?.starts_with("True");
    let shape_text = header_value(header, "shape")?;
    let close = shape_text
        .find(')')
        .ok_or_else(|| DataError::Npy("bad shape".into()))?;
    let shape = shape_text[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| DataError::Npy(format!("bad shape {s}")))
        })
        .collect::<Result<Vec<_>>>()?;
    if dtype.kind == 'O' {
        return Err(DataError::Npy(
            "object .npy files (allow_pickle) are not supported".into(),
        ));
    }
    NdArray::from_raw(dtype, shape, fortran, &bytes[start + hlen..])
}

/// Serialise an array as an .npy (version 1.0, C order).
pub fn to_npy_bytes(array: &NdArray) -> Result<Vec<u8>> {
    let ArrayData::Raw(raw) = &array.data else {
        return Err(DataError::Npy(
            "object arrays cannot be written to .npy".into(),
        ));
    };
    let shape = match array.shape.len() {
        1 => format!("({},)", array.shape[0]),
        _ => format!(
            "({})",
            array
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        array.dtype.descr(),
        shape
    );
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + raw.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(raw);
    Ok(out)
}

/// Read an .npy file.
pub fn read_npy(path: &Path) -> Result<NdArray> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_npy(&bytes).map_err(|e| DataError::Npy(format!("{}: {e}", path.display())))
}

/// Write an .npy file.
pub fn write_npy(path: &Path, array: &NdArray) -> Result<()> {
    std::fs::write(path, to_npy_bytes(array)?).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_u8_and_f64() {
        let a = NdArray::from_u8(vec![2, 2, 3], (0..12).collect());
        let b = to_npy_bytes(&a).unwrap();
        assert_eq!((b.len() - 12) % 64, 0);
        assert_eq!(parse_npy(&b).unwrap(), a);
        let f = NdArray::from_f64(vec![3], &[0.5, -1.0, 2.0]);
        assert_eq!(parse_npy(&to_npy_bytes(&f).unwrap()).unwrap(), f);
    }

    #[test]
    fn parses_fortran_v2_header() {
        let header = "{'descr': '|b1', 'fortran_order': True, 'shape': (2, 2), }\n";
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[2, 0]);
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(&[1, 0, 1, 1]); // column-major [[1,1],[0,1]]
        let a = parse_npy(&b).unwrap();
        assert_eq!(a.to_f64().unwrap(), vec![1.0, 1.0, 0.0, 1.0]);
        assert!(parse_npy(b"garbage").is_err());
    }
}
