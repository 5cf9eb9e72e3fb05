//! `candle_nn::VarBuilder` backends over [`Weights`]: frozen tensors, or trainable `Var`s
//! registered in a `VarMap` (see [`Weights::trainable_var_builder`]).

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap};

use super::Weights;

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Ok(self.get_with_shape(name, &s, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(Weights::get(self, name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

/// Backend of [`Weights::trainable_var_builder`].
pub(crate) struct Trainable {
    pub(crate) weights: Weights,
    pub(crate) varmap: VarMap,
}

impl SimpleBackend for Trainable {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` already has shape {:?}, expected {:?}",
                    v.dims(),
                    s.dims()
                )
            }
            return Ok(v.as_tensor().clone());
        }
        let t = self.weights.get_with_shape(name, &s, dtype, dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.weights.shape(name)?;
        self.get(Shape::from(shape), name, Init::Const(0.), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.contains(name)
    }
}
