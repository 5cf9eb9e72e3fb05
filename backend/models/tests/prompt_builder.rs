//! The interleaved prompt builder: layout, [IMG] positions, the token budget (oldest frames
//! dropped first, never the current caption), caption-only mode and embedding assembly.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use models::llm::{CausalLm, ImgTokens, LlmTokenizer};
use models::prompt::{build_prompt, PromptConfig, PromptError, Segment};

/// A whitespace "tokenizer": one token per word, id = word length (+100 for distinctness).
fn words(text: &str) -> anyhow::Result<Vec<u32>> {
    Ok(text
        .split_whitespace()
        .map(|w| 100 + w.len() as u32)
        .collect())
}

fn cfg(max_len: usize) -> PromptConfig {
    PromptConfig {
        max_len,
        ..PromptConfig::new(vec![900, 901, 902], Some(1))
    }
}

#[test]
fn prompt_empty_history_is_caption_then_img_tokens() {
    let p = build_prompt(&words, &[], "Fred opens the door.", &cfg(160)).unwrap();
    // BOS, "Caption:", 4 caption words, "Image:", 3 [IMG].
    assert_eq!(p.len, 1 + 1 + 4 + 1 + 3);
    assert_eq!(p.img_positions, vec![7, 8, 9]);
    assert_eq!(p.current_caption, 2..6);
    assert_eq!(p.first_kept_frame, 0);
    assert_eq!(p.segments.last(), Some(&Segment::Img(vec![900, 901, 902])));
    let ids = p.ids_with_visual_fill(0);
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[7..], &[900, 901, 902]);
}

#[test]
fn prompt_interleaves_images_and_captions() {
    let p = build_prompt(
        &words,
        &["Fred waves.", "He sits."],
        "They laugh.",
        &cfg(160),
    )
    .unwrap();
    let visual: Vec<&Segment> = p
        .segments
        .iter()
        .filter(|s| matches!(s, Segment::Visual { .. }))
        .collect();
    assert_eq!(
        visual,
        vec![
            &Segment::Visual { frame: 0, len: 4 },
            &Segment::Visual { frame: 1, len: 4 }
        ]
    );
    // per frame: "Image: <img>" (2) + 4 visual + "</img> Caption:" (2) + caption (2) = 10
    assert_eq!(p.len, 1 + 2 * 10 + 1 + 2 + 1 + 3);
    assert_eq!(*p.img_positions.last().unwrap(), p.len - 1);
}

#[test]
fn prompt_overflow_by_one_token_drops_the_oldest_frame_whole() {
    let history = ["Fred waves.", "He sits."];
    let full = build_prompt(&words, &history, "They laugh.", &cfg(160))
        .unwrap()
        .len;
    let fits = build_prompt(&words, &history, "They laugh.", &cfg(full)).unwrap();
    assert_eq!((fits.len, fits.first_kept_frame), (full, 0));
    let p = build_prompt(&words, &history, "They laugh.", &cfg(full - 1)).unwrap();
    assert_eq!(p.first_kept_frame, 1);
    assert_eq!(p.len, full - 10);
    assert!(p
        .segments
        .iter()
        .all(|s| !matches!(s, Segment::Visual { frame: 0, .. })));
    // The current caption is still there, right before " Image:" and the [IMG] tokens.
    assert_eq!(p.current_caption.len(), 2);
}

#[test]
fn prompt_long_story_keeps_the_most_recent_frames_within_budget() {
    let history: Vec<String> = (0..30)
        .map(|i| format!("Frame {i} caption words here."))
        .collect();
    let refs: Vec<&str> = history.iter().map(String::as_str).collect();
    let p = build_prompt(&words, &refs, "Now they talk.", &cfg(160)).unwrap();
    assert!(p.len <= 160);
    assert!(p.first_kept_frame > 0);
    let frames: Vec<usize> = p
        .segments
        .iter()
        .filter_map(|s| match s {
            Segment::Visual { frame, .. } => Some(*frame),
            _ => None,
        })
        .collect();
    assert_eq!(*frames.last().unwrap(), 29);
    assert_eq!(frames, (p.first_kept_frame..30).collect::<Vec<_>>());
}

#[test]
fn prompt_current_caption_longer_than_budget_errors_or_truncates() {
    let long = "word ".repeat(50);
    let err = build_prompt(&words, &["Fred."], &long, &cfg(20)).unwrap_err();
    assert!(
        matches!(
            err,
            PromptError::CurrentTooLong {
                needed: 56,
                budget: 20
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("truncate_current_caption"));
    let mut c = cfg(20);
    c.truncate_current_caption = true;
    let p = build_prompt(&words, &["Fred."], &long, &c).unwrap();
    assert_eq!(p.len, 20);
    assert_eq!(p.first_kept_frame, 1);
    assert_eq!(p.truncated_caption_tokens, 36);
    assert_eq!(p.img_positions, vec![17, 18, 19]);
}

#[test]
fn prompt_caption_only_mode_has_no_visual_slots() {
    let mut c = cfg(160);
    c.caption_only = true;
    let p = build_prompt(&words, &["Fred waves.", "He sits."], "They laugh.", &c).unwrap();
    assert!(p
        .segments
        .iter()
        .all(|s| !matches!(s, Segment::Visual { .. })));
    assert_eq!(p.len, 1 + 2 * 3 + 1 + 2 + 1 + 3);
}

#[test]
fn prompt_embeds_with_real_tokenizer_visual_tokens_and_img_rows() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm_opt");
    let tok = LlmTokenizer::from_dir(&dir, 3).unwrap();
    let lm = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let img = ImgTokens::init(
        &lm,
        3,
        tok.first_img_id().min(lm.vocab_size() as u32 - 3),
        2,
    )
    .unwrap();
    let mut c = PromptConfig::new(img.ids(), tok.bos_id());
    c.visual_tokens_per_frame = 2;
    let p = build_prompt(&tok, &["Fred opens the door."], "He waves.", &c).unwrap();
    let d = lm.embed_dim();
    let visual = vec![Tensor::ones((2, d), DType::F32, &Device::Cpu).unwrap()];
    let e = p.embed(&lm, &img, &visual).unwrap();
    assert_eq!(e.dims(), &[1, p.len, d]);
    let out = lm.forward_embeds(&e, &mut lm.new_cache(), None).unwrap();
    assert_eq!(out.last_hidden_state.dims(), &[1, p.len, d]);
    // Missing visual tokens are a clear error.
    let err = p.embed(&lm, &img, &[]).unwrap_err();
    assert!(
        err.to_string().contains("visual tokens of frame 0"),
        "{err}"
    );
    assert_eq!(p.ids_tensor(&Device::Cpu).unwrap().dims(), &[1, p.len]);
}

#[test]
fn prompt_common_prefix_allows_kv_cache_reuse_between_frames() {
    let c = cfg(160);
    let p2 = build_prompt(&words, &["Fred waves."], "He sits.", &c).unwrap();
    let p3 = build_prompt(&words, &["Fred waves.", "He sits."], "They laugh.", &c).unwrap();
    // BOS + frame 0 (2 + 4 + 2 + 2) are shared.
    assert_eq!(p3.common_prefix_len(&p2), 11);
    assert_eq!(p2.img_range(), p2.img_positions[0]..p2.len);
    // Once the oldest frame is dropped only BOS + " Image: <img>" (before frame 1's slot) is shared.
    let tight = build_prompt(
        &words,
        &["Fred waves.", "He sits."],
        "They laugh.",
        &cfg(p3.len - 1),
    )
    .unwrap();
    assert_eq!(tight.common_prefix_len(&p2), 3);
}
