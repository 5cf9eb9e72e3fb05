//! Random weights as a loaded bundle holds them, for the benchmarks.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarMap;

/// Detached copies of `vars`' tensors. A model built from these holds plain tensors, as one
/// loaded from safetensors does; built from the `Var`s themselves every activation would track
/// gradients (and the LLM's KV cache would take its autograd path).
pub fn detached(vars: &VarMap) -> HashMap<String, Tensor> {
    vars.data()
        .lock()
        .expect("the VarMap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect()
}
