//! Issue #17: the job queue in the database, measured without the model. Fills the queue with
//! 1000 jobs (100 stories of 3 frames, 10 jobs each), times the queries a busy queue leans on
//! (the job list a client pages through, the queue counts `/readyz` and every enqueue read, a
//! job's events), then drains it with 1, 2, 4 and 8 concurrent claimers (each claim is the
//! real `claim` transaction, followed by `finish`) and reports the claim latency under that
//! contention and whether any job was claimed twice. Runs on SQLite, and on PostgreSQL when
//! `--database` names one (the database is emptied first: use a scratch one).
//!
//! ```text
//! cargo run --release -p server --example queue_bench -- [--database postgres://...] [--jobs 1000]
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use server::store::job_runs::{self, Outcome};
use server::store::jobs::{self, GenerateSpec};
use server::store::stories;
use sqlx::AnyPool;

const STORIES: usize = 100;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let jobs: usize = value("--jobs").map_or(Ok(1000), |v| v.parse())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let sqlite = server::db::open(&dir.path().join("bench.db")).await?;
        println!("## SQLite (one file, WAL)\n");
        bench(&sqlite, jobs).await?;
        if let Some(url) = value("--database") {
            let pool = server::db::open_url(&url).await?;
            sqlx::query("TRUNCATE stories, characters, jobs, workers RESTART IDENTITY CASCADE")
                .execute(&pool)
                .await?;
            println!("\n## PostgreSQL ({})\n", server::db::redact(&url));
            bench(&pool, jobs).await?;
        }
        Ok(())
    })
}

fn spec() -> GenerateSpec {
    GenerateSpec {
        frames: None,
        base_seed: Some(1),
        keep_seeds: false,
        steps: 1,
        guidance_scale: 5.0,
        scheduler: "pndm".into(),
        bundle: "bench".into(),
        negative_prompt: String::new(),
        size: None,
        continue_frames: 0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Median time of `runs` calls of `f`.
async fn median<F, Fut, T>(runs: usize, mut f: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, server::error::ApiError>>,
{
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f().await.map_err(|e| anyhow::anyhow!(e.detail))?;
        times.push(ms(start.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    Ok(percentile(&times, 0.5))
}

async fn bench(pool: &AnyPool, total: usize) -> anyhow::Result<()> {
    let captions: Vec<String> = ["Fred walks.", "He waves.", "He sits."]
        .map(String::from)
        .to_vec();
    let mut ids = Vec::new();
    for i in 0..STORIES {
        let story = stories::create(pool, None, &format!("Story {i}"), &captions, &[])
            .await
            .map_err(|e| anyhow::anyhow!(e.detail))?;
        ids.push(story.id);
    }
    let start = Instant::now();
    for n in 0..total {
        jobs::enqueue(pool, ids[n % STORIES], &spec(), None, 1_000_000)
            .await
            .map_err(|e| anyhow::anyhow!(e.detail))?;
    }
    let enqueue = start.elapsed();
    println!(
        "- enqueue {total} jobs one by one: {:.0} ms ({:.2} ms a job)",
        ms(enqueue),
        ms(enqueue) / total as f64
    );
    let queued = vec!["queued".to_string()];
    let list = median(20, || jobs::list(pool, None, None, &queued, None, 50)).await?;
    let last_page = {
        let cursor = server::store::encode_cursor((total - 50) as i64);
        median(20, || {
            jobs::list(pool, None, None, &queued, Some(&cursor), 50)
        })
        .await?
    };
    let counts = median(20, || jobs::counts(pool)).await?;
    println!(
        "- with {total} queued: first page of `GET /api/jobs?status=queued` (50) {list:.2} ms, \
         last page {last_page:.2} ms, queue counts {counts:.2} ms (medians of 20)"
    );

    let per_round = total / 4;
    for claimers in [1usize, 2, 4, 8] {
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let claimed = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..claimers {
            let (pool, latencies, claimed) = (pool.clone(), latencies.clone(), claimed.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("bench-{c}");
                loop {
                    if claimed.lock().map(|v| v.len()).unwrap_or(usize::MAX) >= per_round {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let t = Instant::now();
                    let job = job_runs::claim(&pool, &name, Duration::from_secs(30))
                        .await
                        .map_err(|e| anyhow::anyhow!(e.detail))?;
                    let took = ms(t.elapsed());
                    let Some(job) = job else { return Ok(()) };
                    latencies
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(took);
                    claimed
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(job.job_id);
                    job_runs::finish(&pool, &job, &Outcome::Succeeded)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.detail))?;
                }
            }));
        }
        for task in tasks {
            task.await??;
        }
        let wall = start.elapsed();
        let mut latencies = latencies
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        latencies.sort_by(f64::total_cmp);
        let claimed = claimed
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone();
        let unique: HashSet<i64> = claimed.iter().copied().collect();
        println!(
            "- {claimers} claimer(s): {} claims + finishes in {:.0} ms ({:.0} a second); claim \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} claimed twice",
            claimed.len(),
            ms(wall),
            claimed.len() as f64 / wall.as_secs_f64(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN),
            claimed.len() - unique.len()
        );
        if claimed.len() != unique.len() {
            anyhow::bail!("a job was claimed twice");
        }
    }
    Ok(())
}
