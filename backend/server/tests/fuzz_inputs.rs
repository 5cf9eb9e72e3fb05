//! Issue #18: property ("fuzz") tests of the two parsers that take arbitrary user input
//! before anything else looks at it.
//!
//! - The caption analysis (`server::mentions::analyse`, on `data::find_mentions`): arbitrary
//!   Unicode captions up to the 1000-character cap and casts of up to 64 arbitrary names
//!   never panic, finish quickly, and give spans on character boundaries, in order, not
//!   overlapping, whose offsets and text match the caption; a cast member's name written as
//!   a whole word is found as that character.
//! - The portrait decoder (`server::images::normalize_portrait`): arbitrary bytes, and valid
//!   PNG / JPEG / WebP files with bits flipped, bytes overwritten, inserted or deleted, or cut
//!   short, never panic and give either a refusal with one of the documented codes or an image
//!   within the size limits that decodes again.
//!
//! Each target runs batches of random cases for a fixed wall-clock budget (12 s; the
//! environment variable `FUZZ_SECONDS` changes it), so a slow machine runs fewer cases rather
//! than a longer test. A failure prints the smallest failing input proptest could shrink to.

use std::fmt::Debug;
use std::io::Cursor;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use server::images::{normalize_portrait, MAX_PIXELS, MAX_SIDE};
use server::mentions::{analyse, CastMember, Span, SpanKind};
use server::store::characters::Pronoun;
use server::validate::{MAX_CAPTION_CHARS, MAX_CAST, MAX_NAME_CHARS};

/// Cases per batch; batches run until the budget is spent (at least one).
const BATCH: u32 = 64;
/// Longest one case may take. A linear analysis of a few 1000-character captions takes well
/// under a millisecond, and decoding a small image a few; this only catches runaway work.
const CASE_LIMIT: Duration = Duration::from_secs(2);

fn budget() -> Duration {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12.0);
    Duration::from_secs_f64(seconds)
}

/// Runs `test` on random values of `strategy` for the time budget.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: Debug,
{
    let config = Config {
        cases: BATCH,
        failure_persistence: None,
        // Shrinking a failure stops after a minute; what it has by then is printed.
        max_shrink_time: 60_000,
        ..Config::default()
    };
    let (started, budget) = (Instant::now(), budget());
    let mut batches = 0;
    while batches == 0 || started.elapsed() < budget {
        // A runner counts its cases for good, so each batch gets a fresh one (and a fresh
        // random seed).
        let mut runner = TestRunner::new(config.clone());
        if let Err(failure) = runner.run(&strategy, &test) {
            panic!("{name}: {failure}");
        }
        batches += 1;
    }
    println!(
        "{name}: {} cases in {:.1} s",
        batches * BATCH,
        started.elapsed().as_secs_f64()
    );
}

/// Runs `work` and checks it took less than [`CASE_LIMIT`]; a case over it is run once more
/// (the machine may just have been busy), and fails only when it is slow twice.
fn bounded<T>(what: &str, work: impl Fn() -> T) -> Result<T, TestCaseError> {
    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let out = work();
        let took = started.elapsed();
        if took < CASE_LIMIT {
            return Ok(out);
        }
        slowest = took;
    }
    Err(TestCaseError::fail(format!(
        "{what} took {slowest:?} twice (limit {CASE_LIMIT:?})"
    )))
}

// ---------------------------------------------------------------------------------------
// The caption analysis
// ---------------------------------------------------------------------------------------

fn pronoun() -> impl Strategy<Value = Pronoun> {
    prop_oneof![
        Just(Pronoun::He),
        Just(Pronoun::She),
        Just(Pronoun::They),
        Just(Pronoun::It)
    ]
}

/// Any Unicode text of up to `max` characters, control characters and all.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max).prop_map(String::from_iter)
}

/// Pieces a caption is made of: words that mean something to the analysis (pronouns, titles,
/// capitalised words, possessive and quote marks, sentence ends) mixed with arbitrary
/// characters, so that the cases exercise names, pronouns and unknown names, not only noise.
fn caption_piece(names: Vec<String>) -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "he",
        "He",
        "him",
        "his",
        "himself",
        "she",
        "She",
        "her",
        "hers",
        "herself",
        "they",
        "They",
        "them",
        "their",
        "theirs",
        "themselves",
        "it",
        "It",
        "its",
        "itself",
        "Mr",
        "Mr.",
        "Dr",
        "Mrs",
        "I",
        "OK",
        "TV",
        "Monday",
        "Bamm",
        "Zoë",
        "Ünal",
        "the",
        "and",
        "then",
        "to",
        "with",
        "'s",
        "'",
        "\u{2019}s",
        "\u{2019}",
        "\"",
        "\u{201c}",
        "(",
        "—",
        ".",
        "!",
        "?",
        "…",
        ",",
        ";",
        " ",
        "  ",
        "\t",
    ])
    .prop_map(str::to_string);
    let name = if names.is_empty() {
        Just(String::from("Nobody")).boxed()
    } else {
        prop::sample::select(names).boxed()
    };
    prop_oneof![
        4 => words,
        2 => name,
        1 => any::<char>().prop_map(String::from),
        1 => any_text(12),
    ]
}

/// A caption of pieces, cut to the analysed length cap.
fn caption(names: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(caption_piece(names), 0..300).prop_map(|pieces| {
            pieces
                .join(" ")
                .chars()
                .take(MAX_CAPTION_CHARS)
                .collect::<String>()
        }),
        1 => any_text(MAX_CAPTION_CHARS),
    ]
}

/// A story: a cast of up to 64 arbitrary names and a few captions that use them.
fn story() -> impl Strategy<Value = (Vec<CastMember>, Vec<String>)> {
    let name = prop_oneof![any_text(MAX_NAME_CHARS), realistic_name()];
    prop::collection::vec((name, pronoun()), 0..=MAX_CAST).prop_flat_map(|cast| {
        let names: Vec<String> = cast.iter().map(|(n, _)| n.clone()).collect();
        let cast: Vec<CastMember> = cast
            .into_iter()
            .map(|(name, pronoun)| CastMember { name, pronoun })
            .collect();
        (Just(cast), prop::collection::vec(caption(names), 1..=4))
    })
}

/// Checks every span of one caption's analysis against the caption.
fn check_spans(caption: &str, spans: &[Span], cast: &[CastMember]) -> Result<(), TestCaseError> {
    let mut previous_end = 0;
    for span in spans {
        let (bs, be) = (span.byte_start, span.byte_end);
        prop_assert!(
            bs < be && be <= caption.len(),
            "span {span:?} of {caption:?}"
        );
        prop_assert!(
            caption.is_char_boundary(bs) && caption.is_char_boundary(be),
            "span {span:?} is not on character boundaries"
        );
        prop_assert!(
            bs >= previous_end,
            "span {span:?} overlaps the one before or is out of order"
        );
        previous_end = be;
        prop_assert_eq!(&span.text, &caption[bs..be]);
        prop_assert_eq!(span.start, caption[..bs].chars().count());
        prop_assert_eq!(span.end, caption[..be].chars().count());
        match &span.kind {
            SpanKind::Character { cast_index, .. } => prop_assert!(*cast_index < cast.len()),
            SpanKind::Pronoun { refers_to, .. } => {
                prop_assert!(refers_to.iter().all(|&i| i < cast.len()), "{span:?}")
            }
            SpanKind::Unknown => {}
        }
    }
    Ok(())
}

#[test]
fn caption_analysis_takes_any_input() {
    fuzz("caption analysis", story(), |(cast, captions)| {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let analysed = bounded("the analysis", || analyse(&refs, &cast))?;
        prop_assert_eq!(analysed.len(), captions.len());
        for (caption, spans) in captions.iter().zip(&analysed) {
            check_spans(caption, spans, &cast)?;
        }
        // The data crate's parser on its own, with the same cast as its rule set.
        let rules = server::mentions::rule_set(&cast);
        for caption in &captions {
            let mentions = bounded("find_mentions", || data::find_mentions(caption, &rules))?;
            let mut previous_end = 0;
            for m in &mentions {
                prop_assert!(m.byte_start < m.byte_end && m.byte_end <= caption.len());
                prop_assert!(caption.is_char_boundary(m.byte_start));
                prop_assert!(caption.is_char_boundary(m.byte_end));
                prop_assert!(m.byte_start >= previous_end, "{m:?} overlaps");
                previous_end = m.byte_end;
                prop_assert_eq!(m.start, caption[..m.byte_start].chars().count());
                prop_assert_eq!(m.end, caption[..m.byte_end].chars().count());
            }
        }
        Ok(())
    });
}

/// Letters of several scripts and digits (all alphanumeric, none that lowercases into more
/// than one character or into a combining mark), so names are words as a caption writes them.
const NAME_LETTERS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\
                            éèêëñçåøüöäßÉÑÇÅØÜαβγδλμπωΑΒΓΔΛдмитрийДМИТРЙ李王明東京ひらがな";

/// A name as people write them: one to three words joined by a space, a hyphen, an
/// apostrophe (either kind) or a dot and a space ("Jean-Luc", "O'Brien", "Dr. No").
fn realistic_name() -> impl Strategy<Value = String> {
    let letters: Vec<char> = NAME_LETTERS.chars().collect();
    let word =
        prop::collection::vec(prop::sample::select(letters), 1..=10).prop_map(String::from_iter);
    let joint = prop::sample::select(vec![" ", "-", "'", "\u{2019}", ". "]);
    (word.clone(), prop::collection::vec((joint, word), 0..=2)).prop_map(|(first, rest)| {
        let mut name = first;
        for (joint, word) in rest {
            name.push_str(joint);
            name.push_str(&word);
        }
        name
    })
}

/// Two names a caption cannot tell apart: the same words and inner punctuation, whatever
/// the case, the dots and either apostrophe.
fn same_name(a: &str, b: &str) -> bool {
    let key = |s: &str| {
        s.to_lowercase()
            .replace('.', " ")
            .replace('\u{2019}', "'")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    key(a) == key(b)
}

#[test]
fn a_cast_name_written_as_a_whole_word_is_found() {
    // A cast (the name at index 0 is the one written), text around it, and how it is
    // written: as is or in lower case (ASCII letters), possessive or not.
    let case = (
        prop::collection::vec((realistic_name(), pronoun()), 1..=MAX_CAST),
        any_text(200),
        any_text(200),
        any::<bool>(),
        any::<bool>(),
        any::<Index>(),
    );
    fuzz(
        "whole-word names",
        case,
        |(cast, before, after, lower, possessive, pick)| {
            // Distinct names only: a caption cannot tell two spellings of one name apart.
            let mut members: Vec<CastMember> = Vec::new();
            for (name, pronoun) in cast {
                if !members.iter().any(|m| same_name(&m.name, &name)) {
                    members.push(CastMember { name, pronoun });
                }
            }
            let k = pick.index(members.len());
            let name = &members[k].name;
            // "Ab" written "Ab's" is another character's name when the cast also has "Ab's".
            let possessive = possessive
                && !members
                    .iter()
                    .any(|m| same_name(&m.name, &format!("{name}'s")));
            let written = if lower {
                name.to_ascii_lowercase()
            } else {
                name.clone()
            };
            let written = if possessive {
                format!("{written}'s")
            } else {
                written
            };
            // "|" is in no name, so no other name can run into this one from either side.
            let caption = format!("{before} | {written} | {after}");
            let at = before.len() + 3;
            let analysed = bounded("the analysis", || analyse(&[caption.as_str()], &members))?;
            check_spans(&caption, &analysed[0], &members)?;
            let found = analysed[0].iter().find(|s| s.byte_start == at);
            let Some(span) = found else {
                return Err(TestCaseError::fail(format!(
                    "{written:?} (cast member {k}) not found in {caption:?}: {:?}",
                    analysed[0]
                )));
            };
            prop_assert_eq!(span.byte_end, at + written.len(), "{:?}", span);
            prop_assert_eq!(
                &span.kind,
                &SpanKind::Character {
                    cast_index: k,
                    possessive
                }
            );
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// The portrait decoder
// ---------------------------------------------------------------------------------------

/// Valid files to mutate: PNG (RGB, RGBA, grey 16-bit), JPEG and WebP, small and varied.
fn seeds() -> Vec<Vec<u8>> {
    let rgb = RgbImage::from_fn(23, 17, |x, y| {
        Rgb([(x * 11) as u8, (y * 15) as u8, (x ^ y) as u8])
    });
    let rgba = RgbaImage::from_fn(9, 12, |x, y| {
        Rgba([(x * 28) as u8, (y * 21) as u8, 90, (x * y) as u8])
    });
    let grey16 = DynamicImage::ImageRgb8(rgb.clone()).into_luma16();
    let encode = |image: DynamicImage, format: ImageFormat| {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), format)
            .expect("encode a seed image");
        out
    };
    vec![
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png),
        encode(DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::Png),
        encode(DynamicImage::ImageLuma16(grey16), ImageFormat::Png),
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg),
        encode(
            DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| {
                Rgb([x as u8 * 3, y as u8 * 5, 7])
            })),
            ImageFormat::Jpeg,
        ),
        encode(DynamicImage::ImageRgba8(rgba), ImageFormat::WebP),
        encode(DynamicImage::ImageRgb8(rgb), ImageFormat::WebP),
    ]
}

/// One change to a file's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    /// A byte that often means something to these formats (0xFF before a JPEG marker, a
    /// length's high byte), written over one.
    Special(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0..8u8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::sample::select(vec![0x00, 0x01, 0x7F, 0x80, 0xFF, 0xD8, 0xD9, 0xDA, 0xC0, 0xC2]))
            .prop_map(|(i, v)| Mutation::Special(i, v)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        match m {
            Mutation::FlipBit(i, bit) => bytes[i.index(len)] ^= 1 << bit,
            Mutation::SetByte(i, v) | Mutation::Special(i, v) => bytes[i.index(len)] = *v,
            Mutation::Insert(i, v) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len)),
        }
    }
    bytes
}

/// How often each answer came, so the output shows the cases reached the decoders.
type Tally = std::sync::Mutex<std::collections::BTreeMap<String, usize>>;

fn report(name: &str, tally: &Tally) {
    let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    println!("{name}: {tally:?}");
}

/// What the decoder may answer: a refusal with a documented code, or a bounded image that
/// decodes again to the size it reports.
fn check_upload(bytes: &[u8], tally: &Tally) -> Result<(), TestCaseError> {
    let answer = bounded("the decoder", || normalize_portrait(bytes))?;
    let label = match &answer {
        Ok(image) => format!("accepted {}", image.mime),
        Err(e) => e.code.to_string(),
    };
    *tally
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(label)
        .or_default() += 1;
    match answer {
        Ok(image) => {
            prop_assert!(image.width >= 1 && image.height >= 1);
            prop_assert!(image.width <= MAX_SIDE && image.height <= MAX_SIDE);
            prop_assert!(u64::from(image.width) * u64::from(image.height) <= MAX_PIXELS);
            prop_assert!(
                matches!(image.mime, "image/png" | "image/jpeg"),
                "{}",
                image.mime
            );
            let back = image::load_from_memory(&image.bytes).map_err(|e| {
                TestCaseError::fail(format!("the stored image does not decode: {e}"))
            })?;
            prop_assert_eq!((back.width(), back.height()), (image.width, image.height));
        }
        Err(e) => {
            let answer = (e.status.as_u16(), e.code);
            prop_assert!(
                matches!(
                    answer,
                    (413, "payload_too_large")
                        | (415, "unsupported_image_type")
                        | (422, "invalid_image")
                        | (422, "image_too_large")
                ),
                "unexpected answer {answer:?}: {}",
                e.detail
            );
        }
    }
    Ok(())
}

#[test]
fn the_upload_decoder_takes_any_bytes() {
    // Arbitrary bytes, half of them after a real signature so they reach the decoders.
    let signature = prop::sample::select(vec![
        b"".to_vec(),
        b"\x89PNG\r\n\x1a\n".to_vec(),
        b"\xFF\xD8\xFF".to_vec(),
        b"RIFF\x00\x01\x00\x00WEBPVP8L".to_vec(),
        b"RIFF\x00\x01\x00\x00WEBPVP8 ".to_vec(),
    ]);
    let bytes =
        (signature, prop::collection::vec(any::<u8>(), 0..2048)).prop_map(|(mut head, tail)| {
            head.extend(tail);
            head
        });
    let tally = Tally::default();
    fuzz("arbitrary uploads", bytes, |bytes| {
        check_upload(&bytes, &tally)
    });
    report("arbitrary uploads", &tally);
}

#[test]
fn the_upload_decoder_takes_damaged_images() {
    let seeds = seeds();
    // Each seed is accepted as it is.
    for seed in &seeds {
        let image = normalize_portrait(seed).unwrap_or_else(|e| panic!("{}: {}", e.code, e.detail));
        assert!(image.width > 0);
    }
    let case = (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(), 1..=6),
    );
    let tally = Tally::default();
    fuzz("damaged uploads", case, |(seed, mutations)| {
        check_upload(&mutate(seed, &mutations), &tally)
    });
    report("damaged uploads", &tally);
}
