//! The evaluation classifier: a small CNN that says which characters are in a frame
//! (multi-hot, sigmoid > 0.5) and where it happens (one background out of the dataset's),
//! trained by `storygpt-v train classifier` on ground-truth frames and read by
//! `storygpt-v eval` to score generated ones (the paper fine-tunes Inception-v3 for the same
//! job on FlintstonesSV; on the toy world a small network suffices).
//!
//! Built only from the `nn` crate's layers (docs/NN.md): a 3x3 stem at full resolution,
//! then per further level a stride-2 3x3 convolution (the downsampling) and
//! `convs_per_level` stride-1 ones, each followed by GroupNorm + SiLU; global average and
//! global max pooling, concatenated, give the features (the penultimate layer, which the
//! evaluation's "FID (classifier features)" is computed in), and two linear heads the
//! character and background logits. The max is there for the characters: a small figure
//! barely moves a mean dominated by the background (with the mean alone a test run learned
//! the backgrounds in 75 steps and a third of the character sets in 600), while one strongly
//! firing position is enough for the max.
//!
//! Exported as `DIR/config.json` ([`ClassifierConfig`]) and `DIR/model.safetensors`;
//! [`Classifier::load`] reads them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// The network's shape and the label names; written as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Input frames are resized to `image_size` x `image_size` pixels.
    pub image_size: usize,
    /// Channels of the stem and of each further level (each of which halves the grid).
    pub channels: Vec<usize>,
    /// Stride-1 convolutions after each further level's stride-2 one.
    pub convs_per_level: usize,
    /// GroupNorm groups (must divide every channel count).
    pub norm_groups: usize,
    /// Character names, in multi-hot label order.
    pub characters: Vec<String>,
    /// Background names, in label order (empty: the dataset has no background labels and the
    /// network has no background head).
    pub backgrounds: Vec<String>,
}

impl ClassifierConfig {
    /// Width of the pooled features (mean and max of the last level's channels).
    pub fn feature_dim(&self) -> usize {
        2 * *self.channels.last().unwrap_or(&0)
    }

    /// Refuses shapes the network cannot be built with.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            !self.channels.is_empty(),
            "classifier: `channels` must name at least one level"
        );
        anyhow::ensure!(
            self.norm_groups > 0 && self.channels.iter().all(|c| c % self.norm_groups == 0),
            "classifier: every channel count of {:?} must divide into {} groups",
            self.channels,
            self.norm_groups
        );
        let down = 1usize << (self.channels.len() - 1);
        anyhow::ensure!(
            self.image_size >= down,
            "classifier: {}-pixel frames are too small for {} halvings",
            self.image_size,
            self.channels.len() - 1
        );
        anyhow::ensure!(
            !self.characters.is_empty(),
            "classifier: the dataset names no characters"
        );
        Ok(())
    }
}

/// A convolution followed by GroupNorm + SiLU.
#[derive(Debug, Clone)]
struct ConvBlock {
    conv: nn::Conv2d,
    norm: nn::GroupNorm,
}

impl ConvBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, stride: usize, groups: usize) -> Result<Self> {
        let cfg = nn::Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: nn::Conv2d::new(vb.pp("conv"), cin, cout, 3, cfg, true)?,
            norm: nn::GroupNorm::new(vb.pp("norm"), groups, cout, 1e-5, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward_silu(&self.conv.forward(x)?)?)
    }
}

/// What the network says about a batch of frames.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// `(n, characters)` logits; a character is present where the logit is > 0.
    pub char_logits: Tensor,
    /// `(n, backgrounds)` logits, when the network has a background head.
    pub bg_logits: Option<Tensor>,
    /// `(n, feature_dim)` global mean then global max of the last level's channels.
    pub features: Tensor,
}

/// The network (trainable when built from a `VarMap` builder, frozen when loaded).
#[derive(Debug, Clone)]
pub struct ClassifierNet {
    blocks: Vec<ConvBlock>,
    char_head: nn::Linear,
    bg_head: Option<nn::Linear>,
    config: ClassifierConfig,
}

impl ClassifierNet {
    /// Builds the network; tensor names `blocks.K.{conv,norm}.*`, `char_head.*`, `bg_head.*`.
    pub fn new(vb: VarBuilder, config: &ClassifierConfig) -> Result<Self> {
        config.validate()?;
        let g = config.norm_groups;
        let mut blocks = Vec::new();
        let mut k = 0;
        let mut push = |cin: usize, cout: usize, stride: usize| -> Result<()> {
            blocks.push(ConvBlock::new(
                vb.pp(format!("blocks.{k}")),
                cin,
                cout,
                stride,
                g,
            )?);
            k += 1;
            Ok(())
        };
        push(3, config.channels[0], 1)?;
        for pair in config.channels.windows(2) {
            push(pair[0], pair[1], 2)?;
            for _ in 0..config.convs_per_level {
                push(pair[1], pair[1], 1)?;
            }
        }
        let d = config.feature_dim();
        let char_head = nn::Linear::new(vb.pp("char_head"), d, config.characters.len(), true)?;
        let bg_head = if config.backgrounds.is_empty() {
            None
        } else {
            Some(nn::Linear::new(
                vb.pp("bg_head"),
                d,
                config.backgrounds.len(),
                true,
            )?)
        };
        Ok(Self {
            blocks,
            char_head,
            bg_head,
            config: config.clone(),
        })
    }

    /// Runs the network on `(n, 3, s, s)` pixels in `[-1, 1]`.
    pub fn forward(&self, x: &Tensor) -> Result<ClassifierOutput> {
        let mut h = x.clone();
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        let flat = h.flatten_from(2)?;
        let features = Tensor::cat(&[flat.mean(D::Minus1)?, flat.max(D::Minus1)?], 1)?;
        let char_logits = self.char_head.forward(&features)?;
        let bg_logits = self
            .bg_head
            .as_ref()
            .map(|l| l.forward(&features))
            .transpose()?;
        Ok(ClassifierOutput {
            char_logits,
            bg_logits,
            features,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }
}

/// Mean binary cross-entropy of `logits` against 0 / 1 `targets` (same shape), in the stable
/// form `max(x, 0) - x y + log(1 + exp(-|x|))` (PyTorch's `binary_cross_entropy_with_logits`).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let pos = logits.relu()?;
    let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((pos - logits.mul(targets)?)? + soft)?.mean_all()?)
}

/// Mean cross-entropy of `(n, k)` logits against class indices `(n,)` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = nn::log_softmax_last_dim(logits)?;
    Ok(lp
        .gather(&targets.unsqueeze(1)?, D::Minus1)?
        .mean_all()?
        .neg()?)
}

/// What the classifier says about one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FramePrediction {
    /// Character logits (present where > 0, i.e. sigmoid > 0.5).
    pub char_logits: Vec<f32>,
    /// Background logits (empty without a background head).
    pub bg_logits: Vec<f32>,
    /// Pooled features.
    pub features: Vec<f32>,
}

impl FramePrediction {
    /// The predicted multi-hot character vector.
    pub fn characters(&self) -> Vec<bool> {
        self.char_logits.iter().map(|&l| l > 0.0).collect()
    }

    /// The predicted background index (`None` without a background head).
    pub fn background(&self) -> Option<usize> {
        self.bg_logits
            .iter()
            .enumerate()
            .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
                Some((_, b)) if b >= v => best,
                _ => Some((i, v)),
            })
            .map(|(i, _)| i)
    }
}

/// A trained classifier loaded for evaluation.
pub struct Classifier {
    net: ClassifierNet,
    device: Device,
    dir: PathBuf,
}

impl Classifier {
    /// Loads `dir/config.json` and `dir/model.safetensors`; `dir` may also be the `--out` of
    /// `train classifier` (its `classifier/` folder is used).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = if dir.join("config.json").is_file() {
            dir.to_path_buf()
        } else {
            dir.join("classifier")
        };
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "reading {} (train one with `storygpt-v train classifier`)",
                cfg_path.display()
            )
        })?;
        let config: ClassifierConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let w = nn::Weights::open(dir.join("model.safetensors"))
            .with_context(|| format!("classifier weights in {}", dir.display()))?;
        let net = ClassifierNet::new(w.var_builder(DType::F32, device), &config)
            .with_context(|| format!("building the classifier of {}", dir.display()))?;
        Ok(Self {
            net,
            device: device.clone(),
            dir,
        })
    }

    /// Wraps an already built network.
    pub fn from_net(net: ClassifierNet, device: &Device) -> Self {
        Self {
            net,
            device: device.clone(),
            dir: PathBuf::new(),
        }
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its configuration (label names, input size).
    pub fn config(&self) -> &ClassifierConfig {
        self.net.config()
    }

    /// Runs the network on `(n, 3, s, s)` pixels in `[-1, 1]`.
    pub fn forward(&self, x: &Tensor) -> Result<ClassifierOutput> {
        self.net.forward(x)
    }

    /// Classifies frames of any size (resized to the network's input), 64 at a time.
    pub fn classify(&self, images: &[RgbImage]) -> Result<Vec<FramePrediction>> {
        let s = self.config().image_size;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(64) {
            let resized: Vec<RgbImage> = chunk.iter().map(|i| resize_to(i, s as u32)).collect();
            let refs: Vec<&RgbImage> = resized.iter().collect();
            let x = Tensor::from_vec(
                crate::stages::pixels_of(&refs),
                (chunk.len(), 3, s, s),
                &Device::Cpu,
            )?
            .to_device(&self.device)?;
            let o = self.net.forward(&x)?;
            let c = o.char_logits.to_vec2::<f32>()?;
            let f = o.features.to_vec2::<f32>()?;
            let b = match &o.bg_logits {
                Some(b) => b.to_vec2::<f32>()?,
                None => vec![Vec::new(); chunk.len()],
            };
            for ((c, b), f) in c.into_iter().zip(b).zip(f) {
                out.push(FramePrediction {
                    char_logits: c,
                    bg_logits: b,
                    features: f,
                });
            }
        }
        Ok(out)
    }
}

/// `img` at `size` x `size` (bilinear; unchanged when it already is).
pub fn resize_to(img: &RgbImage, size: u32) -> RgbImage {
    if img.dimensions() == (size, size) {
        img.clone()
    } else {
        image::imageops::resize(img, size, size, image::imageops::FilterType::Triangle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use nn::gradcheck::{gradcheck, seeded_uniform, GradCheckOptions};

    fn tiny_config() -> ClassifierConfig {
        ClassifierConfig {
            image_size: 8,
            channels: vec![4, 4],
            convs_per_level: 1,
            norm_groups: 2,
            characters: vec!["A".into(), "B".into(), "C".into()],
            backgrounds: vec!["x".into(), "y".into()],
        }
    }

    /// The loss the stage trains with, on a fixed batch.
    fn loss_of(net: &ClassifierNet, x: &Tensor, y: &Tensor, bg: &Tensor) -> Result<Tensor> {
        let o = net.forward(x)?;
        Ok((bce_with_logits(&o.char_logits, y)?
            + cross_entropy(o.bg_logits.as_ref().unwrap(), bg)?)?)
    }

    #[test]
    fn every_parameter_gets_a_gradient_that_matches_finite_differences() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = crate::stages::seeded_var_builder(&varmap, 3, DType::F64, &dev);
        let net = ClassifierNet::new(vb, &tiny_config()).unwrap();
        // Move the norms off their constant initialisation so their gradients are generic.
        for (name, var) in crate::stages::named_vars(&varmap) {
            if name.contains("norm") {
                let t = seeded_uniform(var.shape(), 7, 0.5, 1.5, DType::F64, &dev).unwrap();
                var.set(&t).unwrap();
            }
        }
        let x = seeded_uniform((3, 3, 8, 8), 1, -1.0, 1.0, DType::F64, &dev).unwrap();
        let y = Tensor::new(&[[1f64, 0., 1.], [0., 0., 1.], [1., 1., 0.]], &dev).unwrap();
        let bg = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        let loss = loss_of(&net, &x, &y, &bg).unwrap();
        nn::check_all_vars_get_gradient(&loss, &varmap).unwrap();
        let vars = crate::stages::named_vars(&varmap);
        let named: Vec<(&str, &candle_core::Var)> =
            vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let report = gradcheck(
            &named,
            || loss_of(&net, &x, &y, &bg).map_err(|e| candle_core::Error::msg(e.to_string())),
            &GradCheckOptions {
                max_elements_per_var: 12,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.passed(1e-5), "{report}");
        // 16 variables, up to 12 elements each (biases and heads are smaller).
        assert!(report.checked >= 90, "{report}");
    }

    #[test]
    fn losses_match_hand_computed_values() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, -1.0], [0.0, 30.0]], &dev).unwrap();
        let y = Tensor::new(&[[1f32, 0.0], [1.0, 0.0]], &dev).unwrap();
        let bce = bce_with_logits(&logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let sp = |x: f64| (1.0 + x.exp()).ln();
        // -log sigmoid(2), -log(1 - sigmoid(-1)), -log sigmoid(0), -log(1 - sigmoid(30))
        let expect = (sp(-2.0) + sp(-1.0) + sp(0.0) + sp(30.0)) / 4.0;
        assert!((bce - expect).abs() < 1e-5, "{bce} vs {expect}");
        let ce = cross_entropy(&logits, &Tensor::new(&[0u32, 1], &dev).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let expect = (sp(-3.0) + sp(-30.0)) / 2.0;
        assert!((ce - expect).abs() < 1e-5, "{ce} vs {expect}");
    }

    #[test]
    fn a_saved_network_loads_back_with_the_same_outputs() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = crate::stages::seeded_var_builder(&varmap, 1, DType::F32, &dev);
        let cfg = tiny_config();
        let net = ClassifierNet::new(vb, &cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        varmap.save(dir.path().join("model.safetensors")).unwrap();
        let loaded = Classifier::load(dir.path(), &dev).unwrap();
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 40]));
        let p = loaded.classify(std::slice::from_ref(&img)).unwrap();
        let x = Tensor::from_vec(
            crate::stages::pixels_of(&[&resize_to(&img, 8)]),
            (1, 3, 8, 8),
            &dev,
        )
        .unwrap();
        let o = net.forward(&x).unwrap();
        assert_eq!(p[0].char_logits, o.char_logits.to_vec2::<f32>().unwrap()[0]);
        assert_eq!(p[0].features.len(), 8);
        assert!(p[0].background().is_some());
        assert!(Classifier::load(&dir.path().join("nope"), &dev).is_err());
    }
}
