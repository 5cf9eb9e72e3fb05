//! `results.md`: the evaluation as Markdown tables, one per story length (systems x metrics,
//! each system also on its pronoun frames alone), and Char-Acc against story length when
//! several lengths ran (the paper's Table 5).

use std::fmt::Write;

use super::{EvalResults, Scores, System, SystemResult};

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.2}", 100.0 * x))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn row(out: &mut String, name: &str, s: &Scores, seconds: Option<f64>) {
    let _ = writeln!(
        out,
        "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        s.frames,
        pct(s.char_acc),
        pct(s.char_f1),
        pct(s.bg_acc),
        pct(s.bg_f1),
        num(s.fid_classifier, 3),
        num(s.clip_text_image, 3),
        num(s.clip_image_image, 3),
        seconds.map_or("-".into(), |x| format!("{x:.3}")),
    );
}

fn system_rows(out: &mut String, r: &SystemResult) {
    let seconds = (r.system != "ground-truth").then_some(r.seconds_per_frame);
    row(out, &r.system, &r.all, seconds);
    row(
        out,
        &format!("{} (pronoun frames)", r.system),
        &r.pronoun,
        None,
    );
}

/// The Markdown report of `r`; `systems` gives the order of the rows.
pub fn markdown(r: &EvalResults, systems: &[System]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Evaluation results\n");
    let _ = writeln!(
        out,
        "Bundle `{}`, data `{}` ({} split), classifier `{}`; {} denoising steps, seed {}; {:.1} s in all.\n",
        r.bundle,
        r.data,
        r.split.key(),
        r.classifier,
        r.steps,
        r.seed,
        r.wall_time_s
    );
    let _ = writeln!(
        out,
        "Char-Acc: exact match of the character multi-hot vector; Char-F1: micro F1 over \
         characters; BG-Acc: background accuracy; BG-F1: macro F1 over backgrounds (all in %). \
         FID (classifier): Frechet distance of the evaluation classifier's features to the \
         ground-truth frames' (lower is better; not Inception FID, not comparable with \
         published FIDs). CLIP-T: CLIP cosine of frame and named caption; CLIP-I: of frame and \
         ground-truth frame (the bundle's CLIP). `ground-truth` scores the dataset's own \
         frames: the classifier's accuracy on real frames. Pronoun frames: frames after the \
         first whose referential caption uses a pronoun.\n"
    );
    for l in &r.lengths {
        let frames: usize = l.systems.first().map_or(0, |s| s.all.frames);
        let rss = match (l.peak_rss_mib, l.peak_rss_reset) {
            (Some(m), true) => format!("peak RSS {m:.0} MiB"),
            (Some(m), false) => format!("peak RSS since start {m:.0} MiB"),
            (None, _) => "peak RSS not measured".into(),
        };
        let _ = writeln!(
            out,
            "## {}-frame stories\n\n{} stories, {frames} frames; {rss}; {:.1} s.\n",
            l.frames, l.stories, l.wall_time_s
        );
        let _ = writeln!(
            out,
            "| system | frames | Char-Acc | Char-F1 | BG-Acc | BG-F1 | FID (classifier) | CLIP-T | CLIP-I | s/frame |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        if let Some(gt) = l.systems.iter().find(|s| s.system == "ground-truth") {
            system_rows(&mut out, gt);
        }
        for sys in systems {
            if let Some(s) = l.systems.iter().find(|s| s.system == sys.key()) {
                system_rows(&mut out, s);
            }
        }
        out.push('\n');
    }
    if r.lengths.len() > 1 {
        let _ = writeln!(out, "## Char-Acc by story length\n");
        let _ = writeln!(
            out,
            "| frames | system | Char-Acc | Char-Acc (pronoun frames) | s/frame | peak RSS (MiB) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for sys in systems {
            for l in &r.lengths {
                if let Some(s) = l.systems.iter().find(|s| s.system == sys.key()) {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {:.3} | {} |",
                        l.frames,
                        s.system,
                        pct(s.all.char_acc),
                        pct(s.pronoun.char_acc),
                        s.seconds_per_frame,
                        num(l.peak_rss_mib, 0)
                    );
                }
            }
        }
    }
    if r.lengths.iter().any(|l| l.frames > 4) {
        let _ = writeln!(
            out,
            "\n## Char-Acc by frame position\n\nFrames grouped by their place in the story \
             (1-based), frames scored in brackets.\n"
        );
        let _ = writeln!(out, "| frames | system | positions: Char-Acc (frames) |");
        let _ = writeln!(out, "|---|---|---|");
        for l in &r.lengths {
            let names = std::iter::once("ground-truth").chain(systems.iter().map(|s| s.key()));
            for name in names {
                if let Some(s) = l.systems.iter().find(|s| s.system == name) {
                    let cells: Vec<String> = s
                        .by_position
                        .iter()
                        .map(|p| {
                            let range = if p.first == p.last {
                                p.first.to_string()
                            } else {
                                format!("{}-{}", p.first, p.last)
                            };
                            format!("{range}: {:.2} ({})", 100.0 * p.char_acc, p.frames)
                        })
                        .collect();
                    let _ = writeln!(out, "| {} | {} | {} |", l.frames, name, cells.join(", "));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::LengthResult;
    use super::*;

    fn scores(frames: usize, acc: f64) -> Scores {
        Scores {
            frames,
            char_acc: Some(acc),
            char_f1: Some(0.5),
            bg_acc: None,
            bg_f1: None,
            fid_classifier: Some(1.25),
            clip_text_image: Some(0.1),
            clip_image_image: None,
        }
    }

    fn length(frames: usize, acc: f64) -> LengthResult {
        let sys = |name: &str| SystemResult {
            system: name.into(),
            all: scores(8, acc),
            pronoun: scores(3, acc / 2.0),
            seconds_per_frame: 0.25,
            by_position: vec![
                super::super::PositionScore {
                    first: 1,
                    last: 1,
                    frames: 2,
                    char_acc: 1.0,
                },
                super::super::PositionScore {
                    first: 2,
                    last: 4,
                    frames: 6,
                    char_acc: acc,
                },
            ],
        };
        LengthResult {
            frames,
            stories: 2,
            systems: vec![sys("ground-truth"), sys("storygpt-v"), sys("ldm-text")],
            peak_rss_mib: Some(100.0),
            peak_rss_reset: true,
            wall_time_s: 3.0,
        }
    }

    #[test]
    fn tables_list_each_system_with_its_pronoun_row_in_the_order_asked() {
        let r = EvalResults {
            bundle: "b".into(),
            data: "d".into(),
            split: data::dataset::Split::Test,
            classifier: "c".into(),
            steps: 3,
            seed: 1,
            max_stories: Some(2),
            lengths: vec![length(4, 0.875), length(10, 0.5)],
            wall_time_s: 6.0,
        };
        let md = markdown(&r, &[System::LdmText, System::StoryGptV]);
        assert!(
            md.contains("| storygpt-v | 8 | 87.50 | 50.00 | - | - | 1.250 | 0.100 | - | 0.250 |")
        );
        assert!(md.contains("| storygpt-v (pronoun frames) | 3 | 43.75 |"));
        // The ground truth comes first and has no generation time.
        let gt = md.find("| ground-truth | 8 |").unwrap();
        let ldm = md.find("| ldm-text | 8 |").unwrap();
        let sgv = md.find("| storygpt-v | 8 |").unwrap();
        assert!(gt < ldm && ldm < sgv);
        assert!(md.contains("| ground-truth | 8 | 87.50 | 50.00 | - | - | 1.250 | 0.100 | - | - |"));
        assert!(md.contains("## Char-Acc by story length"));
        assert!(md.contains("| 10 | storygpt-v | 50.00 | 25.00 | 0.250 | 100 |"));
        assert!(md.contains("## Char-Acc by frame position"));
        assert!(md.contains("| 10 | storygpt-v | 1: 100.00 (2), 2-4: 50.00 (6) |"));
    }
}
