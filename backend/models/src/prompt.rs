//! The interleaved image / caption prompt of StoryGPT-V stage 2 (authors' format):
//!
//! ```text
//! <bos> Image: <img>[m visual tokens of I1]</img> Caption: S1 ... Image: <img>[I_{n-1}]</img>
//! Caption: S_{n-1} Caption: S_n Image: [IMG0]...[IMG{R-1}]
//! ```
//!
//! [`build_prompt`] turns the captions into a sequence of [`Segment`]s (text token ids,
//! visual-token slots of past frames, the `[IMG]` ids) and records where the `[IMG]` tokens
//! and the current caption sit; [`Prompt::embed`] assembles the LLM input embeddings from it.
//!
//! Tokenisation: each text piece (`" Image: <img>"`, `"</img> Caption:"`, `" S_k"`,
//! `" Caption:"`, `" Image:"`) is tokenised separately without special tokens, and one BOS is
//! put first when the config has one.
//!
//! Budget (default 160 tokens, BOS and `[IMG]` tokens included): while the prompt is too long
//! the OLDEST past frame (its visual tokens and its caption, as a whole) is dropped; the current
//! caption is never dropped. If the prompt without any history is still too long, the result
//! is [`PromptError::CurrentTooLong`], or, with `truncate_current_caption`, the current
//! caption's tokens are cut from the END so that the prompt fits (the " Image:" suffix and the
//! `[IMG]` tokens always stay).
//!
//! Caption-only mode (paper's ablation, Table 4) leaves out the images: past frames are
//! `" Caption: S_k"`.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use crate::llm::{CausalLm, ImgTokens, LlmTokenizer};

/// Anything that turns text into token ids (no special tokens).
pub trait Tokenize {
    /// Token ids of `text`.
    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>>;
}

impl Tokenize for LlmTokenizer {
    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        self.encode(text)
    }
}

impl<F: Fn(&str) -> anyhow::Result<Vec<u32>>> Tokenize for F {
    fn tokenize(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        self(text)
    }
}

/// How the prompt is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptConfig {
    /// Token budget (160 in the paper).
    pub max_len: usize,
    /// Visual tokens per past frame, m (4).
    pub visual_tokens_per_frame: usize,
    /// Ids of `[IMG0]..[IMG{R-1}]`.
    pub img_token_ids: Vec<u32>,
    /// BOS id put first, if any.
    pub bos_id: Option<u32>,
    /// Leave out the images of past frames (ablation).
    pub caption_only: bool,
    /// Cut the current caption instead of failing when it alone overflows the budget.
    pub truncate_current_caption: bool,
}

impl PromptConfig {
    /// The paper's settings (160 tokens, m = 4) for the given `[IMG]` ids and BOS.
    pub fn new(img_token_ids: Vec<u32>, bos_id: Option<u32>) -> Self {
        Self {
            max_len: 160,
            visual_tokens_per_frame: 4,
            img_token_ids,
            bos_id,
            caption_only: false,
            truncate_current_caption: false,
        }
    }
}

/// One piece of the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text token ids (frozen embedding table).
    Text(Vec<u32>),
    /// The m visual tokens of past frame `frame` (index into the history).
    Visual {
        /// Index of the frame in the history given to [`build_prompt`].
        frame: usize,
        /// Number of visual tokens.
        len: usize,
    },
    /// The `[IMG]` token ids (trainable rows).
    Img(Vec<u32>),
}

impl Segment {
    /// Number of positions.
    pub fn len(&self) -> usize {
        match self {
            Segment::Text(t) | Segment::Img(t) => t.len(),
            Segment::Visual { len, .. } => *len,
        }
    }

    /// Whether the segment has no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A built prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The pieces, in order.
    pub segments: Vec<Segment>,
    /// Total positions.
    pub len: usize,
    /// Positions of `[IMG0]..[IMG{R-1}]`.
    pub img_positions: Vec<usize>,
    /// Positions of the current caption's tokens (L_gen targets in the authors' variant).
    pub current_caption: Range<usize>,
    /// History frames kept: `first_kept_frame..history_len`.
    pub first_kept_frame: usize,
    /// Tokens cut from the end of the current caption (0 unless truncation was needed).
    pub truncated_caption_tokens: usize,
}

/// Why a prompt could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The current caption alone does not fit.
    #[error(
        "the current caption needs {needed} prompt tokens but the budget is {budget}; shorten \
         the caption, raise max_len or enable truncate_current_caption"
    )]
    CurrentTooLong {
        /// Tokens the prompt needs without any history.
        needed: usize,
        /// The budget.
        budget: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizing the prompt: {0}")]
    Tokenizer(#[from] anyhow::Error),
}

/// Builds the prompt for the current caption given the captions of the past frames
/// (`history[k]` is the caption of frame k, whose visual tokens fill [`Segment::Visual`]
/// `{frame: k}`). An empty history gives ` Caption: S_1 Image: [IMG..]`.
pub fn build_prompt(
    tok: &impl Tokenize,
    history: &[&str],
    current: &str,
    cfg: &PromptConfig,
) -> std::result::Result<Prompt, PromptError> {
    let m = cfg.visual_tokens_per_frame;
    let frames: Vec<Vec<Segment>> = history
        .iter()
        .enumerate()
        .map(|(k, caption)| -> anyhow::Result<Vec<Segment>> {
            let cap = tok.tokenize(&format!(" {caption}"))?;
            Ok(if cfg.caption_only {
                vec![Segment::Text([tok.tokenize(" Caption:")?, cap].concat())]
            } else {
                vec![
                    Segment::Text(tok.tokenize(" Image: <img>")?),
                    Segment::Visual { frame: k, len: m },
                    Segment::Text([tok.tokenize("</img> Caption:")?, cap].concat()),
                ]
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let frame_len = |f: &Vec<Segment>| f.iter().map(Segment::len).sum::<usize>();
    let cap_prefix = tok.tokenize(" Caption:")?;
    let mut caption = tok.tokenize(&format!(" {current}"))?;
    let suffix = tok.tokenize(" Image:")?;
    let bos = cfg.bos_id.is_some() as usize;
    let fixed = bos + cap_prefix.len() + suffix.len() + cfg.img_token_ids.len();
    let mut truncated = 0;
    if fixed + caption.len() > cfg.max_len {
        if !cfg.truncate_current_caption || fixed > cfg.max_len {
            return Err(PromptError::CurrentTooLong {
                needed: fixed + caption.len(),
                budget: cfg.max_len,
            });
        }
        truncated = fixed + caption.len() - cfg.max_len;
        caption.truncate(caption.len() - truncated);
    }
    let mut total = fixed + caption.len() + frames.iter().map(frame_len).sum::<usize>();
    let mut first_kept = 0;
    while total > cfg.max_len {
        total -= frame_len(&frames[first_kept]);
        first_kept += 1;
    }
    let mut segments = Vec::new();
    if let Some(b) = cfg.bos_id {
        segments.push(Segment::Text(vec![b]));
    }
    segments.extend(frames.into_iter().skip(first_kept).flatten());
    let before_caption: usize = segments.iter().map(Segment::len).sum::<usize>() + cap_prefix.len();
    let current_caption = before_caption..before_caption + caption.len();
    segments.push(Segment::Text([cap_prefix, caption, suffix].concat()));
    let img_start: usize = segments.iter().map(Segment::len).sum();
    segments.push(Segment::Img(cfg.img_token_ids.clone()));
    let len = img_start + cfg.img_token_ids.len();
    debug_assert_eq!(len, total);
    Ok(Prompt {
        segments,
        len,
        img_positions: (img_start..len).collect(),
        current_caption,
        first_kept_frame: first_kept,
        truncated_caption_tokens: truncated,
    })
}

impl Prompt {
    /// Ids of every position, with `fill` at the visual-token slots (for the L_gen
    /// target tensor and for debugging).
    pub fn ids_with_visual_fill(&self, fill: u32) -> Vec<u32> {
        self.segments
            .iter()
            .flat_map(|s| match s {
                Segment::Text(t) | Segment::Img(t) => t.clone(),
                Segment::Visual { len, .. } => vec![fill; *len],
            })
            .collect()
    }

    /// Assembles the `(1, len, d)` LLM input embeddings: text and `[IMG]` ids through
    /// [`ImgTokens::embed`] (trainable `[IMG]` rows), `visual[k]` `(m, d)` (Mapper_LLM output
    /// of history frame k) at the visual slots. Differentiable in the `[IMG]` rows and the
    /// visual tokens.
    pub fn embed(&self, lm: &CausalLm, img: &ImgTokens, visual: &[Tensor]) -> Result<Tensor> {
        let dev = lm.device();
        let mut parts = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            match s {
                Segment::Text(t) | Segment::Img(t) => {
                    if t.is_empty() {
                        continue;
                    }
                    let ids = Tensor::from_vec(t.clone(), (1, t.len()), dev)?;
                    parts.push(img.embed(lm, &ids)?);
                }
                Segment::Visual { frame, len } => {
                    let Some(v) = visual.get(*frame) else {
                        candle_core::bail!(
                            "prompt needs the visual tokens of frame {frame}, only {} given",
                            visual.len()
                        )
                    };
                    if v.dims() != [*len, lm.embed_dim()] {
                        candle_core::bail!(
                            "visual tokens of frame {frame} have shape {:?}, expected [{len}, {}]",
                            v.dims(),
                            lm.embed_dim()
                        )
                    }
                    parts.push(v.to_dtype(lm.dtype())?.unsqueeze(0)?);
                }
            }
        }
        Tensor::cat(&parts, 1)
    }

    /// The `[IMG]` positions as a range (they are contiguous at the end of the prompt), e.g.
    /// to `narrow` the LLM's `last_hidden_state` for Mapper_LDM.
    pub fn img_range(&self) -> Range<usize> {
        let start = self.img_positions.first().copied().unwrap_or(self.len);
        start..start + self.img_positions.len()
    }

    /// Number of leading positions shared with `other` (whole equal segments; a visual slot is
    /// equal when it is the same history frame). After the previous frame's prompt was run,
    /// truncate the KV cache to this length and feed only the rest.
    pub fn common_prefix_len(&self, other: &Prompt) -> usize {
        self.segments
            .iter()
            .zip(&other.segments)
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len())
            .sum()
    }

    /// The `(1, len)` ids tensor for [`crate::stage2_losses::lgen_loss`] (visual slots get id 0;
    /// they are never targets).
    pub fn ids_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_vec(self.ids_with_visual_fill(0), (1, self.len), device)?.to_dtype(DType::I64)
    }
}
