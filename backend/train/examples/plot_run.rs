//! Redraws a run's curves from its metrics log (the stages draw them at the end of a run):
//! `cargo run --release -p train --example plot_run -- METRICS.jsonl OUT.svg STAGE VAL_KEY LABEL`

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: plot_run METRICS.jsonl OUT.svg STAGE VAL_KEY LABEL"
    );
    train::plot::training_curves(a[0].as_ref(), a[1].as_ref(), &a[2], &a[3], &a[4])
}
