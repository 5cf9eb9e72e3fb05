//! Stage `lm`: the toy causal LM (OPT family) trained on the dataset's stories, a story as one
//! document in the caption format of StoryGPT-V's prompt (" Caption: S1 Caption: S2 ..."), both
//! the original and the referential form. It learns its own byte-level BPE vocabulary from the
//! training captions and the prompt markers, and is exported in the transformers layout
//! (`OUT/llm/{config.json, model.safetensors, tokenizer.json}`) that `CausalLm::load` reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use data::dataset::{DatasetKind, DatasetReader, Split};
use models::llm::{CausalLm, LlmTokenizer, LogitsFor, Opt, OptConfig};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// `[lm]`: the model's shape, the vocabulary and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmSection {
    /// Hidden width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub ffn_dim: usize,
    /// BPE merges learned from the training captions.
    pub bpe_merges: usize,
    /// Tokens per training document (longer stories are cut, shorter ones padded).
    pub seq_len: usize,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
    /// Validation stories (perplexity and the pronoun cloze).
    pub val_stories: usize,
    /// Use only the first N training stories (all when absent).
    pub train_stories: Option<usize>,
    /// Fill every training row to `seq_len` with the stories that follow (each starts with
    /// `</s>`), so every position the stage-2 prompt reaches is trained, not only a story's length.
    pub pack: bool,
    /// Also train on this many text-only stories of the toy world, drawn from `toy_text_seed`
    /// (no frames are rendered): the toy LM's counterpart of an LLM's pre-training text, so
    /// that it stops memorising the dataset's few thousand stories (docs/TRAINING.md). Stories
    /// whose captions equal a validation or test story's are left out. Toy world only.
    pub toy_text_stories: usize,
    /// Seed of those stories; choose one other than the dataset's.
    pub toy_text_seed: u64,
}

impl Default for LmSection {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            layers: 4,
            heads: 4,
            ffn_dim: 512,
            bpe_merges: 600,
            seq_len: 96,
            story_len: 4,
            val_stories: 200,
            train_stories: None,
            pack: false,
            toy_text_stories: 0,
            toy_text_seed: 1,
        }
    }
}

impl StageSection for LmSection {
    const NAME: &'static str = "lm";
}

/// A story as one document in the prompt's caption format.
pub fn document(captions: &[String]) -> String {
    captions.iter().map(|c| format!(" Caption: {c}")).collect()
}

/// Tokenised documents, padded to `seq_len` (or packed, see [`LmSection::pack`]).
pub struct LmSource {
    docs: Vec<Vec<u32>>,
    seq_len: usize,
    pad: u32,
    pack: bool,
}

/// Ids `(B, T)`, next-token targets and a 1 / 0 loss mask, flattened.
pub struct LmBatch {
    ids: Vec<u32>,
    targets: Vec<u32>,
    mask: Vec<f32>,
    n: usize,
}

fn padded_rows(docs: &[&Vec<u32>], seq_len: usize, pad: u32) -> LmBatch {
    let (mut ids, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for d in docs {
        for t in 0..seq_len {
            let cur = d.get(t).copied();
            let next = d.get(t + 1).copied();
            ids.push(cur.unwrap_or(pad));
            targets.push(next.unwrap_or(pad));
            mask.push(if cur.is_some() && next.is_some() {
                1.0
            } else {
                0.0
            });
        }
    }
    LmBatch {
        ids,
        targets,
        mask,
        n: docs.len(),
    }
}

impl LmSource {
    /// Document `first` followed by every second document after it (the documents come in
    /// pairs, a story's original and referential forms: a story is not followed by its own
    /// other form) until the row holds `seq_len + 1` tokens, inputs and next-token targets.
    fn packed_row(&self, first: usize) -> Vec<u32> {
        let n = self.docs.len();
        let mut row = Vec::with_capacity(self.seq_len + 1);
        for k in 0..n {
            if row.len() > self.seq_len {
                break;
            }
            row.extend_from_slice(&self.docs[(first + 2 * k) % n]);
        }
        row.truncate(self.seq_len + 1);
        row
    }
}

impl BatchSource for LmSource {
    type Batch = LmBatch;
    fn len(&self) -> usize {
        self.docs.len()
    }
    fn batch(&self, indices: &[usize], _rng: &mut ChaCha8Rng) -> Result<LmBatch> {
        if !self.pack {
            let docs: Vec<&Vec<u32>> = indices.iter().map(|&i| &self.docs[i]).collect();
            return Ok(padded_rows(&docs, self.seq_len, self.pad));
        }
        let rows: Vec<Vec<u32>> = indices.iter().map(|&i| self.packed_row(i)).collect();
        let refs: Vec<&Vec<u32>> = rows.iter().collect();
        Ok(padded_rows(&refs, self.seq_len, self.pad))
    }
}

/// One pronoun-cloze question: the document up to a subject pronoun, the right pronoun and the
/// alternatives of the same case (He / She / They or he / she / they).
struct Cloze {
    prefix: Vec<u32>,
    answer: u32,
    choices: [u32; 3],
}

/// The trainable LM and its validation data.
pub struct LmStage {
    varmap: VarMap,
    lm: CausalLm,
    config_json: serde_json::Value,
    device: Device,
    val: Vec<Vec<u32>>,
    cloze: Vec<Cloze>,
    seq_len: usize,
    pad: u32,
    tokenizer_dir: std::path::PathBuf,
}

fn stories(
    reader: &DatasetReader,
    split: Split,
    limit: usize,
) -> Result<Vec<(Vec<String>, Vec<String>)>> {
    let ids = reader.story_ids(split);
    anyhow::ensure!(!ids.is_empty(), "the {} split has no stories", split.key());
    ids.iter()
        .take(limit)
        .map(|id| {
            let s = reader
                .story_text(id)
                .with_context(|| format!("reading story {id}"))?;
            Ok((
                s.frames.iter().map(|f| f.caption.clone()).collect(),
                s.frames.iter().map(|f| f.referential.clone()).collect(),
            ))
        })
        .collect()
}

/// Learns the vocabulary into `OUT/llm`, tokenises the data and builds the model.
pub fn prepare(
    section: &LmSection,
    data: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<(LmStage, Arc<LmSource>, String)> {
    let reader = DatasetReader::open(data, DatasetKind::Auto, section.story_len)
        .with_context(|| format!("opening dataset {}", data.display()))?;
    let mut train = stories(
        &reader,
        Split::Train,
        section.train_stories.unwrap_or(usize::MAX),
    )?;
    let val = stories(&reader, Split::Val, section.val_stories)?;
    let dataset_train = train.len();
    if section.toy_text_stories > 0 {
        check_toy_cast(&reader.rules().character_names(), data)?;
        let held_out: std::collections::HashSet<Vec<String>> =
            stories(&reader, Split::Val, usize::MAX)?
                .into_iter()
                .chain(stories(&reader, Split::Test, usize::MAX)?)
                .map(|(orig, _)| orig)
                .collect();
        let extra = toy_text_corpus(
            section.toy_text_seed,
            section.toy_text_stories,
            section.story_len,
            &held_out,
        );
        eprintln!(
            "lm: {} text-only toy-world stories of seed {} added ({} left out as equal to a validation or test story)",
            extra.len(),
            section.toy_text_seed,
            section.toy_text_stories - extra.len()
        );
        train.extend(extra);
    }
    // The vocabulary: training captions in both forms, and the prompt markers of stage 2.
    let mut corpus = Vec::new();
    for (orig, refl) in &train[..dataset_train] {
        corpus.push(document(orig));
        corpus.push(document(refl));
        for r in refl {
            corpus.push(format!(" Image: <img></img> Caption: {r} Caption:"));
        }
    }
    let dir = out.join("llm");
    let vocab = models::bundle::bpe::write_llm_tokenizer(&dir, &corpus, section.bpe_merges)?;
    let tok = LlmTokenizer::from_dir(&dir, 0)?;
    let bos = tok
        .token_to_id("</s>")
        .context("the tokenizer has no </s>")?;
    let pad = tok
        .token_to_id("<pad>")
        .context("the tokenizer has no <pad>")?;
    let encode = |text: &str| -> Result<Vec<u32>> {
        let mut ids = vec![bos];
        ids.extend(tok.encode(text)?);
        Ok(ids)
    };
    let mut docs = Vec::new();
    let mut fingerprint = super::FNV_OFFSET;
    for (orig, refl) in &train {
        for d in [document(orig), document(refl)] {
            fingerprint = super::fnv1a(d.bytes(), fingerprint);
            docs.push(encode(&d)?);
        }
    }
    let mut val_docs = Vec::new();
    let mut cloze = Vec::new();
    for (orig, refl) in &val {
        val_docs.push(encode(&document(orig))?);
        let ids = encode(&document(refl))?;
        cloze.extend(cloze_questions(&tok, &ids));
        val_docs.push(ids);
    }
    anyhow::ensure!(
        !cloze.is_empty(),
        "the validation stories have no he / she / they to test"
    );
    let config_json = json!({
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": vocab,
        "hidden_size": section.hidden_size,
        "word_embed_proj_dim": section.hidden_size,
        "ffn_dim": section.ffn_dim,
        "num_hidden_layers": section.layers,
        "num_attention_heads": section.heads,
        "max_position_embeddings": 256,
        "do_layer_norm_before": true,
        "activation_function": "relu",
        "enable_bias": true,
        "layer_norm_elementwise_affine": true,
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": bos,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    anyhow::ensure!(
        section.seq_len <= 256,
        "lm.seq_len must be at most 256 (the model's positions)"
    );
    let cfg: OptConfig = serde_json::from_value(config_json.clone())?;
    let varmap = VarMap::new();
    let vb = super::seeded_var_builder(&varmap, seed, DType::F32, device);
    let lm = CausalLm::Opt(Opt::new(&cfg, vb.pp("model")).context("building the toy OPT")?);
    // nn::Embedding starts from N(0, 1) like torch.nn.Embedding; OPT (and GPT-2) start their
    // token and position tables at N(0, 0.02), without which the tied output layer begins with
    // logits of size ~sqrt(hidden) and a loss near 18 instead of ln(vocab).
    for (name, var) in super::named_vars(&varmap) {
        if name.contains("embed_tokens") || name.contains("embed_positions") {
            var.set(&(var.as_tensor() * 0.02)?)?;
        }
    }
    let source = Arc::new(LmSource {
        docs,
        seq_len: section.seq_len,
        pad,
        pack: section.pack,
    });
    let stage = LmStage {
        varmap,
        lm,
        config_json,
        device: device.clone(),
        val: val_docs,
        cloze,
        seq_len: section.seq_len,
        pad,
        tokenizer_dir: dir,
    };
    Ok((stage, source, format!("{fingerprint:016x}")))
}

/// `toy_text_stories` adds the toy world's stories: refused for a dataset with another cast
/// (FlintstonesSV, PororoSV, a user's own), whose LM they would only mislead.
fn check_toy_cast(cast: &[&str], data: &Path) -> Result<()> {
    let toy: Vec<String> = data::toyworld::character_infos()
        .into_iter()
        .map(|c| c.name)
        .collect();
    anyhow::ensure!(
        cast.len() == toy.len() && cast.iter().zip(&toy).all(|(a, b)| *a == b.as_str()),
        "lm.toy_text_stories adds stories of the toy world, but {} is not one (its cast: {}); \
         set lm.toy_text_stories = 0",
        data.display(),
        cast.join(", ")
    );
    Ok(())
}

/// `n` text-only toy-world stories of `seed`, skipping any whose captions are in `held_out`.
fn toy_text_corpus(
    seed: u64,
    n: usize,
    len: usize,
    held_out: &std::collections::HashSet<Vec<String>>,
) -> Vec<(Vec<String>, Vec<String>)> {
    let rules = data::toyworld::rules();
    (0..n)
        .map(|i| data::toyworld::story_text(seed, i, len, &rules))
        .filter(|(orig, _)| !held_out.contains(orig))
        .collect()
}

/// The subject pronouns of a referential document, as cloze questions.
fn cloze_questions(tok: &LlmTokenizer, ids: &[u32]) -> Vec<Cloze> {
    let set = |words: [&str; 3]| -> Option<[u32; 3]> {
        Some([
            tok.token_to_id(words[0])?,
            tok.token_to_id(words[1])?,
            tok.token_to_id(words[2])?,
        ])
    };
    let groups: Vec<[u32; 3]> = [["ĠHe", "ĠShe", "ĠThey"], ["Ġhe", "Ġshe", "Ġthey"]]
        .into_iter()
        .filter_map(set)
        .collect();
    let mut out = Vec::new();
    for (pos, &id) in ids.iter().enumerate().skip(1) {
        if let Some(g) = groups.iter().find(|g| g.contains(&id)) {
            out.push(Cloze {
                prefix: ids[..pos].to_vec(),
                answer: id,
                choices: *g,
            });
        }
    }
    out
}

impl LmStage {
    fn nll(&self, b: &LmBatch) -> Result<(Tensor, Tensor)> {
        let t = self.seq_len;
        let ids = Tensor::from_vec(b.ids.clone(), (b.n, t), &self.device)?;
        let targets = Tensor::from_vec(b.targets.clone(), (b.n, t, 1), &self.device)?;
        let mask = Tensor::from_vec(b.mask.clone(), (b.n, t), &self.device)?;
        let mut cache = self.lm.new_cache();
        let out = self
            .lm
            .forward_ids_with(&ids, &mut cache, None, LogitsFor::All)?;
        let logp = nn::log_softmax_last_dim(&out.logits)?;
        let picked = logp.gather(&targets, D::Minus1)?.squeeze(D::Minus1)?;
        let total = (picked * &mask)?.sum_all()?.neg()?;
        Ok((total, mask.sum_all()?))
    }

    /// Mean validation negative log-likelihood per token and the cloze accuracy.
    pub fn evaluate(&self) -> Result<(f64, f64)> {
        let (mut nll, mut count) = (0f64, 0f64);
        for chunk in self.val.chunks(32) {
            let docs: Vec<&Vec<u32>> = chunk.iter().collect();
            let (t, n) = self.nll(&padded_rows(&docs, self.seq_len, self.pad))?;
            nll += t.to_scalar::<f32>()? as f64;
            count += n.to_scalar::<f32>()? as f64;
        }
        let mut right = 0usize;
        for q in &self.cloze {
            let ids = Tensor::from_vec(q.prefix.clone(), (1, q.prefix.len()), &self.device)?;
            let mut cache = self.lm.new_cache();
            let out = self
                .lm
                .forward_ids_with(&ids, &mut cache, None, LogitsFor::Last)?;
            let logits = out.logits.flatten_all()?.to_vec1::<f32>()?;
            let best = q
                .choices
                .iter()
                .copied()
                .max_by(|a, b| logits[*a as usize].total_cmp(&logits[*b as usize]))
                .unwrap_or(q.answer);
            right += usize::from(best == q.answer);
        }
        Ok((nll / count.max(1.0), right as f64 / self.cloze.len() as f64))
    }

    /// Number of cloze questions.
    pub fn cloze_count(&self) -> usize {
        self.cloze.len()
    }

    /// Writes `config.json` and `model.safetensors` next to the tokenizer in `OUT/llm`.
    pub fn export(&self) -> Result<()> {
        let dir = &self.tokenizer_dir;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json)?,
        )?;
        self.varmap
            .save(dir.join("model.safetensors"))
            .with_context(|| format!("writing the LM weights into {}", dir.display()))?;
        Ok(())
    }
}

impl Stage for LmStage {
    type Batch = LmBatch;

    fn name(&self) -> &'static str {
        "lm"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        super::named_vars(&self.varmap)
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("layer_norm") || name.contains("embed")
    }

    fn loss(&mut self, b: &LmBatch, _step: u64) -> Result<StepLoss> {
        let (total, count) = self.nll(b)?;
        let loss = total.broadcast_div(&count.clamp(1f32, f32::MAX)?)?;
        Ok(StepLoss {
            loss,
            parts: vec![],
        })
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        let (nll, cloze) = self.evaluate()?;
        Ok(BTreeMap::from([
            ("perplexity".to_owned(), nll.exp()),
            ("pronoun_cloze".to_owned(), cloze),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn source(pack: bool) -> LmSource {
        LmSource {
            docs: vec![vec![0, 1, 2], vec![0, 3, 4], vec![0, 5, 6, 7], vec![0, 8]],
            seq_len: 6,
            pad: 99,
            pack,
        }
    }

    fn batch_of(pack: bool, index: usize) -> LmBatch {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        source(pack).batch(&[index], &mut rng).unwrap()
    }

    #[test]
    fn the_toy_text_corpus_leaves_out_held_out_stories() {
        let all = toy_text_corpus(3, 6, 5, &Default::default());
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|(o, r)| o.len() == 5 && r.len() == 5));
        assert!(all.iter().any(|(o, r)| o != r), "no pronoun in six stories");
        let held_out = [all[1].0.clone(), all[4].0.clone()].into_iter().collect();
        let kept = toy_text_corpus(3, 6, 5, &held_out);
        assert_eq!(kept, [0, 2, 3, 5].map(|i| all[i].clone()));
    }

    #[test]
    fn the_toy_text_corpus_is_refused_for_another_cast() {
        let toy: Vec<String> = data::toyworld::character_infos()
            .into_iter()
            .map(|c| c.name)
            .collect();
        let toy: Vec<&str> = toy.iter().map(String::as_str).collect();
        assert!(check_toy_cast(&toy, Path::new("toy")).is_ok());
        let err = check_toy_cast(&["Fred", "Wilma"], Path::new("/data/flintstones"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/data/flintstones") && err.contains("Fred, Wilma"),
            "{err}"
        );
        assert!(check_toy_cast(&toy[..3], Path::new("toy")).is_err());
    }

    #[test]
    fn packing_fills_every_position_with_the_following_stories() {
        let b = batch_of(true, 1);
        // Document 1, then 3 (every second one), then 1 again, cut at seq_len + 1 tokens.
        assert_eq!(b.ids, vec![0, 3, 4, 0, 8, 0]);
        assert_eq!(b.targets, vec![3, 4, 0, 8, 0, 3]);
        assert!(b.mask.iter().all(|&m| m == 1.0), "{:?}", b.mask);
    }

    #[test]
    fn without_packing_a_row_is_one_padded_story() {
        let b = batch_of(false, 2);
        assert_eq!(b.ids, vec![0, 5, 6, 7, 99, 99]);
        assert_eq!(b.mask, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }
}
