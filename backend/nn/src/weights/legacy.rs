//! The legacy (non-zip) torch serialisation: what `torch.save(obj, f,
//! _use_new_zipfile_serialization=False)` writes, and every checkpoint saved before torch 1.6.
//!
//! Layout: five pickles back to back (the magic number `0x1950a86a20f9469cfc6c`, the protocol
//! version 1001, a `sys_info` dict, the object itself with tensor storages as persistent ids
//! `('storage', StorageClass, key, location, numel, view_metadata)`, and the list of storage
//! keys), then, for each key of that list in order, an int64 element count followed by the raw
//! little-endian storage bytes. The pickles are parsed with candle's pickle reader; tensors are
//! read lazily from the recorded storage offsets.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

/// The pickled magic number (`LONG1` with 10 little-endian bytes) after `PROTO n`.
const MAGIC: [u8; 12] = [
    0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Tensors of a legacy-format torch checkpoint.
pub(crate) struct LegacyTensors {
    path: PathBuf,
    /// Tensor name -> (layout and dtype, absolute file offset of its storage's first byte).
    infos: HashMap<String, (TensorInfo, u64)>,
}

fn read_pickle<R: std::io::BufRead>(r: &mut R) -> candle_core::Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(r)?;
    stack.finalize()
}

impl LegacyTensors {
    /// Parses the pickles of `path` and locates every storage; `key` selects a nested state
    /// dict (`Some("state_dict")`) as for zip checkpoints.
    pub(crate) fn new(path: &Path, key: Option<&str>) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(file);
        let mut head = [0u8; 15];
        r.read_exact(&mut head)
            .map_err(|e| format!("too short for a torch checkpoint: {e}"))?;
        if head[0] != 0x80 || head[2..14] != MAGIC || head[14] != b'.' {
            return Err(
                "not a torch checkpoint: neither a zip archive (torch >= 1.6) nor \
                        a legacy (non-zip) torch pickle with its magic number"
                    .into(),
            );
        }
        let err = |what: &str, e: candle_core::Error| format!("legacy torch format, {what}: {e}");
        let version = read_pickle(&mut r).map_err(|e| err("protocol version", e))?;
        if version != Object::Int(1001) {
            return Err(format!(
                "legacy torch format: unsupported protocol version {version:?} (expected 1001)"
            ));
        }
        let sys_info = read_pickle(&mut r).map_err(|e| err("sys_info", e))?;
        if let Object::Dict(items) = &sys_info {
            let le = items
                .iter()
                .find(|(k, _)| *k == Object::Unicode("little_endian".into()));
            if let Some((_, Object::Bool(false))) = le {
                return Err("legacy torch format: big-endian checkpoints are not supported".into());
            }
        }
        let obj = read_pickle(&mut r).map_err(|e| err("the saved object", e))?;
        let keys = read_pickle(&mut r).map_err(|e| err("the storage keys", e))?;
        let keys: Vec<String> = match keys {
            Object::List(v) | Object::Tuple(v) => v
                .into_iter()
                .map(|k| k.unicode().map_err(|o| format!("storage key {o:?}")))
                .collect::<Result<_, _>>()?,
            other => return Err(format!("legacy torch format: storage keys are {other:?}")),
        };

        // Element sizes of every storage the object references (also those of tensors outside
        // the selected state dict, e.g. optimizer state), to walk the data section.
        let mut elem_size: HashMap<String, u64> = HashMap::new();
        collect_storages(&obj, &mut elem_size);

        // Tensors of the (possibly nested) state dict, their storage keys in `path`.
        let obj = match key {
            Some(k) => match obj {
                Object::Dict(items) => items
                    .into_iter()
                    .find(|(name, _)| *name == Object::Unicode(k.to_owned()))
                    .map(|(_, v)| v)
                    .ok_or_else(|| format!("key {k} not found"))?,
                other => other,
            },
            None => obj,
        };
        let mut tensors: Vec<TensorInfo> = vec![];
        if let Object::Dict(items) = obj {
            for (name, value) in items {
                if let Ok(Some(info)) = value.into_tensor_info(name, Path::new("")) {
                    tensors.push(info);
                }
            }
        }

        // Storage offsets: walk the data section once.
        let mut offsets: HashMap<String, u64> = HashMap::new();
        let mut pos = r.stream_position().map_err(|e| e.to_string())?;
        let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        for k in &keys {
            let mut n = [0u8; 8];
            r.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
            r.read_exact(&mut n)
                .map_err(|e| format!("legacy torch format: storage {k} truncated: {e}"))?;
            let numel = u64::from_le_bytes(n);
            let size = *elem_size.get(k).ok_or_else(|| {
                format!("legacy torch format: storage {k} has an unknown element type")
            })?;
            offsets.insert(k.clone(), pos + 8);
            pos += 8 + numel * size;
            if pos > len {
                return Err(format!(
                    "legacy torch format: storage {k} ({numel} elements) runs past the end of the file"
                ));
            }
        }
        let mut infos = HashMap::new();
        for t in tensors {
            let off = *offsets.get(storage_key(&t)).ok_or_else(|| {
                format!(
                    "legacy torch format: tensor `{}` uses storage {} that is not in the file",
                    t.name,
                    storage_key(&t)
                )
            })?;
            infos.insert(t.name.clone(), (t, off));
        }
        Ok(Self {
            path: path.to_path_buf(),
            infos,
        })
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.infos.keys().cloned().collect()
    }

    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.infos.get(name).map(|(t, _)| t.layout.dims().to_vec())
    }

    pub(crate) fn get(&self, name: &str) -> candle_core::Result<Tensor> {
        let Some((info, off)) = self.infos.get(name) else {
            candle_core::bail!("tensor vanished from the pickle")
        };
        let layout = &info.layout;
        let fortran = layout.is_fortran_contiguous();
        if !layout.is_contiguous() && !fortran {
            candle_core::bail!("cannot read a non-contiguous tensor {layout:?}")
        }
        let mut f = BufReader::new(std::fs::File::open(&self.path)?);
        f.seek(SeekFrom::Start(off + layout.start_offset() as u64))?;
        let mut bytes = vec![0u8; layout.shape().elem_count() * info.dtype.size_in_bytes()];
        f.read_exact(&mut bytes)?;
        let t = Tensor::from_raw_buffer(&bytes, info.dtype, layout.dims(), &Device::Cpu)?;
        let rank = layout.shape().rank();
        if rank > 1 && fortran && !layout.is_contiguous() {
            let rev: Vec<usize> = layout.dims().iter().rev().copied().collect();
            let perm: Vec<usize> = (0..rank).rev().collect();
            return t.reshape(rev)?.permute(perm);
        }
        Ok(t)
    }
}

/// Records `key -> element size` for every `('storage', StorageClass, key, ...)` persistent id
/// in `obj`.
fn collect_storages(obj: &Object, out: &mut HashMap<String, u64>) {
    match obj {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(v) = id.as_ref() {
                if let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
                    (v.get(1), v.get(2))
                {
                    let size = match class_name.as_str() {
                        "DoubleStorage" | "LongStorage" => 8,
                        "FloatStorage" | "IntStorage" => 4,
                        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
                        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
                        _ => return,
                    };
                    out.insert(key.clone(), size);
                }
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|o| collect_storages(o, out)),
        Object::Dict(items) => items.iter().for_each(|(k, v)| {
            collect_storages(k, out);
            collect_storages(v, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            collect_storages(callable, out);
            collect_storages(args, out);
        }
        _ => {}
    }
}

/// The storage key of a tensor info built with an empty directory name (`/KEY`).
fn storage_key(t: &TensorInfo) -> &str {
    t.path.trim_start_matches('/')
}
