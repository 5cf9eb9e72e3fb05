//! The generation worker: one dedicated OS thread per device that owns the loaded
//! `StoryPipeline` (which need not be `Send`, and whose denoising loop would starve the async
//! runtime), claims queued jobs from the database one at a time, stories taking turns
//! (`store::job_runs::claim`), draws them, and records each step through `store::jobs`
//! (database first, then the live hub).
//!
//! Cancellation is polled before every denoising step: a client's cancel (flagged in memory
//! at once, and in the database), the job vanishing (its story deleted), or the server
//! stopping, in which case the job goes back to the queue without counting as an attempt.
//!
//! Fairness: after each stored frame of a job with frames left, the worker asks whether a job
//! of another story waits. If one does, the job hands its turn back: it stops before its next
//! frame and goes back to the queue (not counted as an attempt), exactly as a clean shutdown
//! puts it back, and the next claim serves the other story. When its turn comes again it
//! resumes as after a restart: the frames it stored are kept and are the context of the rest,
//! with the seeds fixed when it was queued. So one story's long job delays another story's
//! short one by at most one frame.
//!
//! Leases: a claimed job holds a lease that a heartbeat task renews while the worker runs
//! (every fifth of the lease), and the worker looks for jobs whose lease ran out before each
//! claim, so the job of a worker that vanished (killed, its host lost) goes back to the queue
//! with the attempt counted, whichever process or host it ran in. Every write of a job checks
//! that the worker still holds it, so one that comes back after its lease ran out stops
//! without touching the job's new run.

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use models::clip::ClipTokenizer;
use models::pipeline::{
    CharacterInput, Decoding, FrameRequest, GenerateOptions, PipelineEvent, StoryInput,
    StoryPipeline,
};
use sqlx::AnyPool;
use tokio::runtime::Handle;

use crate::live::Hub;
use crate::model::ModelInfo;
use crate::store::frame_attention::AttentionPng;
use crate::store::job_events::{kind, JobEvent};
use crate::store::job_runs::{self as store, Claimed, FinishedFrame, Held, Outcome};
use crate::store::jobs::{JobFrameRow, Progress};
use crate::store::workers;

/// At most one stored `progress` event per job per this interval (every step still goes to
/// live viewers); frame and state-change events are always stored.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often a running job re-reads its row (cancel flag, or gone with its story).
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How long an idle worker sleeps between looks at the queue when nobody wakes it.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// The `reason` of the `queued` event of a job that handed its turn to another story.
const TURN_REASON: &str = "another story's job is waiting: this job lets it go first and \
     resumes after it; frames already drawn are kept";

/// State shared between the worker thread and the service.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    alive: AtomicBool,
    // A set stays valid if a holder panicked, so its lock is taken over when poisoned
    // (`unwrap_or_else(into_inner)`) instead of turning one panic into many.
    cancels: Mutex<HashSet<i64>>,
    /// Time per denoising step, a moving average over the steps drawn (f64 bits; 0 until
    /// the first measurement), for the waiting times the studio shows.
    step_ms: AtomicU64,
}

/// The service's handle on its worker thread, or on none (`serve --workers 0`: the jobs are
/// drawn by `storygpt-v worker` processes elsewhere).
pub struct WorkerHandle {
    /// The model (loaded by this process's worker, or described from the bundle).
    pub model: ModelInfo,
    /// The model's CLIP tokenizer, so the studio can say while a caption is typed how much
    /// of it the text encoder reads.
    pub tokenizer: Arc<ClipTokenizer>,
    /// Whether this process draws (has a worker thread).
    pub local: bool,
    wake: Option<SyncSender<()>>,
    hub: Hub,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Where and as whom the worker announced itself, to record its stop.
    announced: Option<(AnyPool, String)>,
}

/// How a worker runs: its lease, the attempts a job gets, what it stores and streams.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Device to draw on.
    pub device: String,
    /// Ask the model for each character mention's cross-attention heatmap.
    pub capture_attention: bool,
    /// Live preview every this many steps (0: never).
    pub preview_every: usize,
    /// How long a claimed job's lease lasts without a heartbeat.
    pub lease: Duration,
    /// Starts of a job before an interruption fails it.
    pub max_attempts: u32,
}

/// Default lease of a claimed job.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

impl WorkerHandle {
    /// The measured time per denoising step, in milliseconds; `None` before any step.
    pub fn step_ms(&self) -> Option<f64> {
        let ms = f64::from_bits(self.shared.step_ms.load(Ordering::Relaxed));
        (ms > 0.0).then_some(ms)
    }

    /// Tells an idle worker to look at the queue now: this process's, and (PostgreSQL) the
    /// workers of other processes.
    pub fn wake(&self) {
        self.wake_here();
        self.hub.job_queued();
    }

    /// Tells this process's worker, if it has one, to look at the queue now.
    pub fn wake_here(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    /// A handle without a worker: the model is described from the bundle (nothing is loaded)
    /// and jobs are drawn by other processes.
    pub fn without_worker(model: ModelInfo, tokenizer: ClipTokenizer, hub: Hub) -> Self {
        Self {
            model,
            tokenizer: Arc::new(tokenizer),
            local: false,
            wake: None,
            hub,
            shared: Arc::new(Shared::default()),
            thread: Mutex::new(None),
            announced: None,
        }
    }

    /// Asks the running job `job` to stop at its next step (the database flag is the record;
    /// this makes it immediate).
    pub fn cancel(&self, job: i64) {
        self.shared
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job);
    }

    /// The id the worker announced itself with (none without a worker).
    pub fn id(&self) -> Option<String> {
        self.announced.as_ref().map(|(_, id)| id.clone())
    }

    /// Whether this process's worker thread is running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Asks the worker to stop: a running job goes back to the queue at its next step.
    pub fn request_stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Stops the worker and waits (up to `limit`) for its thread to end.
    pub async fn stop(&self, limit: Duration) {
        self.request_stop();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(limit, joined).await.is_err() {
                tracing::warn!(
                    "the worker did not stop in time; its job is requeued once its lease runs out"
                );
                return;
            }
        }
        if let Some((pool, id)) = &self.announced {
            if let Err(e) = workers::stopped(pool, id).await {
                tracing::warn!(worker = %id, error = %e, "cannot record the worker's stop");
            }
        }
    }
}

/// Clears `alive` however the thread ends (panics included), so `/readyz` reports it.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// Starts the worker thread for `device`: it loads the bundle there and reports back before
/// any job is taken. Fails with the loading error when the bundle does not load.
pub async fn start(
    pool: AnyPool,
    hub: Hub,
    bundle: PathBuf,
    settings: WorkerSettings,
) -> anyhow::Result<Arc<WorkerHandle>> {
    let shared = Arc::new(Shared::default());
    let (wake, woken) = sync_channel(1);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let device = settings.device.clone();
    let host = host_name();
    let announcement = workers::Announcement {
        id: format!(
            "{host}/{}/{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
        host,
        pid: i64::from(std::process::id()),
        device: device.clone(),
        bundle: bundle.display().to_string(),
    };
    let ctx = Ctx {
        pool: pool.clone(),
        hub: hub.clone(),
        shared: shared.clone(),
        runtime: Handle::current(),
        name: announcement.id.clone(),
        capture_attention: settings.capture_attention,
        preview_every: settings.preview_every,
        lease: settings.lease,
        max_attempts: settings.max_attempts,
    };
    shared.alive.store(true, Ordering::SeqCst);
    let bundle_dir = bundle.clone();
    let thread = std::thread::Builder::new()
        .name(format!("worker-{device}"))
        .spawn(move || {
            let _guard = AliveGuard(ctx.shared.clone());
            let loaded = load(&bundle, &device);
            let pipeline = match loaded {
                Ok((pipeline, info)) => {
                    let _ = ready_tx.send(Ok(info));
                    pipeline
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            ctx.run(&pipeline, &woken);
        })
        .context("cannot start the worker thread")?;
    let model = match ready_rx.await {
        Ok(Ok(model)) => model,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => anyhow::bail!("the worker thread stopped while loading the model"),
    };
    let tokenizer = load_tokenizer(&bundle_dir)?;
    workers::announce(&pool, &announcement)
        .await
        .map_err(|e| anyhow::anyhow!("cannot announce the worker: {}", e.detail))?;
    tokio::spawn(heartbeats(
        pool.clone(),
        shared.clone(),
        announcement.id.clone(),
        settings.lease,
    ));
    Ok(Arc::new(WorkerHandle {
        model,
        tokenizer: Arc::new(tokenizer),
        local: true,
        wake: Some(wake),
        hub,
        shared,
        thread: Mutex::new(Some(thread)),
        announced: Some((pool, announcement.id)),
    }))
}

/// The bundle's CLIP tokenizer.
pub fn load_tokenizer(bundle: &std::path::Path) -> anyhow::Result<ClipTokenizer> {
    models::bundle::Bundle::open(bundle)
        .and_then(|b| ClipTokenizer::from_dir(&b.tokenizer_dir()?))
        .with_context(|| format!("cannot load the tokenizer of {}", bundle.display()))
}

/// Renews the leases of the worker's jobs and its heartbeat every fifth of the lease while
/// the worker thread lives.
async fn heartbeats(pool: AnyPool, shared: Arc<Shared>, id: String, lease: Duration) {
    let every = (lease / 5).max(Duration::from_millis(100));
    while shared.alive.load(Ordering::SeqCst) {
        if let Err(e) = store::heartbeat(&pool, &id, lease).await {
            tracing::warn!(worker = %id, error = %e, "cannot renew the worker's lease");
        }
        tokio::time::sleep(every).await;
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// What the bundle in `bundle` is, without loading its weights (for a server whose jobs are
/// drawn elsewhere).
pub fn describe(bundle: &std::path::Path, device_name: &str) -> anyhow::Result<ModelInfo> {
    let (info, defaults) = StoryPipeline::describe(bundle)
        .with_context(|| format!("cannot read the model bundle {}", bundle.display()))?;
    Ok(model_info(&info, &defaults, bundle, device_name))
}

fn model_info(
    info: &models::bundle::BundleInfo,
    defaults: &GenerateOptions,
    bundle: &std::path::Path,
    device_name: &str,
) -> ModelInfo {
    ModelInfo {
        name: info.name.clone(),
        description: info.description.clone(),
        trained: info.trained,
        device: device_name.to_string(),
        height: info.height,
        width: info.width,
        sizes: info
            .sizes
            .iter()
            .map(|&(width, height)| crate::model::FrameSize {
                width: width as u32,
                height: height as u32,
            })
            .collect(),
        llm: info.llm.clone(),
        bundle: bundle.display().to_string(),
        default_steps: defaults
            .steps
            .clamp(*models::limits::STEPS.start(), *models::limits::STEPS.end())
            as u32,
        default_guidance: defaults.guidance_scale.clamp(
            *models::limits::GUIDANCE.start(),
            *models::limits::GUIDANCE.end(),
        ),
        default_scheduler: defaults.scheduler.as_str().to_string(),
    }
}

fn load(bundle: &std::path::Path, device_name: &str) -> anyhow::Result<(StoryPipeline, ModelInfo)> {
    let device = nn::device::parse_device(device_name).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let pipeline = StoryPipeline::load(bundle, &device)
        .with_context(|| format!("cannot load the model bundle {}", bundle.display()))?;
    let model = model_info(
        pipeline.info(),
        &pipeline.default_options(),
        bundle,
        device_name,
    );
    tracing::info!(
        bundle = %bundle.display(), name = %model.name, trained = model.trained,
        device = %model.device, seconds = started.elapsed().as_secs_f32(), "model loaded"
    );
    Ok((pipeline, model))
}

struct Ctx {
    pool: AnyPool,
    hub: Hub,
    shared: Arc<Shared>,
    runtime: Handle,
    name: String,
    /// Ask the model for each character mention's cross-attention heatmap.
    capture_attention: bool,
    /// Live preview every this many steps (0: never).
    preview_every: usize,
    /// A claimed job's lease.
    lease: Duration,
    /// Starts of a job before an interruption fails it (for jobs whose lease ran out).
    max_attempts: u32,
}

/// Per-job state the progress callback and the cancel check share.
struct Drawing {
    /// Frames of the job finished so far (earlier attempts included).
    done: usize,
    /// Frames the job draws in all, the captions a continuation has still to write included.
    total: usize,
    /// Denoising steps per frame as the sampler counts them (some samplers take a warm-up
    /// step more than asked); the job's `steps` until the first step says otherwise.
    steps: usize,
    last_stored_progress: Instant,
    last_poll: Instant,
    /// The job's row vanished (its story was deleted).
    gone: bool,
    /// A store error while recording; the job fails with it.
    error: Option<String>,
    /// Another story's job waits: stop before the next frame and hand the turn back.
    handing_over: bool,
    /// When the frame's previous step ended (none before its first step).
    last_step_at: Option<Instant>,
}

impl Ctx {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    fn run(&self, pipeline: &StoryPipeline, woken: &Receiver<()>) {
        tracing::info!(worker = %self.name, "worker ready");
        while !self.stopping() {
            // Jobs of workers that vanished go back to the queue (perhaps to this worker).
            match self.block_on(store::requeue_expired(&self.pool, self.max_attempts)) {
                Ok(recovery) if !recovery.is_empty() => {
                    tracing::warn!(
                        requeued = ?recovery.requeued, failed = ?recovery.failed,
                        cancelled = ?recovery.cancelled,
                        "jobs whose worker stopped renewing their lease"
                    );
                    for event in recovery.events {
                        self.hub.publish(event);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look for jobs with expired leases"),
            }
            match self.block_on(store::claim(&self.pool, &self.name, self.lease)) {
                Ok(Some(job)) => self.run_job(pipeline, job),
                Ok(None) => {
                    if let Err(RecvTimeoutError::Disconnected) = woken.recv_timeout(IDLE_POLL) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim a job; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        tracing::info!("worker stopped");
    }

    fn run_job(&self, pipeline: &StoryPipeline, job: Claimed) {
        tracing::info!(
            job = job.job_id,
            story = job.story_id,
            attempt = job.attempt,
            "job started"
        );
        self.hub.publish(job.event.clone());
        // On the CPU the drawing runs on a pool thread, so the kernels it calls split their
        // work with the pool's other thread without a wake-up per op (nn::on_cpu_pool).
        let outcome = if pipeline.device().is_cpu() {
            nn::on_cpu_pool(|| self.draw(pipeline, &job))
        } else {
            self.draw(pipeline, &job)
        };
        self.shared
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job.job_id);
        let Some(outcome) = outcome else {
            self.vanished(&job);
            return;
        };
        match self.block_on(store::finish(&self.pool, &job, &outcome)) {
            Ok(Some(event)) => {
                if event.kind == kind::QUEUED {
                    tracing::info!(job = job.job_id, outcome = ?outcome, "job back in the queue");
                } else {
                    tracing::info!(job = job.job_id, outcome = ?outcome, "job ended");
                }
                self.hub.publish(event);
            }
            Ok(None) => self.vanished(&job),
            // The row stays `running`; the next start's recovery puts it right.
            Err(e) => {
                tracing::error!(job = job.job_id, error = %e, "cannot record the end of a job")
            }
        }
    }

    /// The job's story was deleted while it ran: tell its viewers (there is no row left to
    /// store an event in).
    fn vanished(&self, job: &Claimed) {
        if let Ok(Held::Lost) = self.block_on(store::held(&self.pool, job)) {
            tracing::warn!(
                job = job.job_id,
                "job stopped: its lease ran out and it went back to the queue"
            );
            return;
        }
        tracing::info!(job = job.job_id, "job stopped: its story was deleted");
        self.hub.publish(JobEvent::new(
            job.job_id,
            job.story_id,
            kind::CANCELLED,
            serde_json::json!({"reason": "the story was deleted"}),
        ));
    }

    /// Draws the job's unfinished frames; `None` when the job vanished meanwhile.
    fn draw(&self, pipeline: &StoryPipeline, job: &Claimed) -> Option<Outcome> {
        let left = job.frames.iter().filter(|f| f.state != "done").count();
        let last = job
            .frames
            .iter()
            .filter(|f| f.state != "done")
            .map(|f| f.position)
            .max();
        if last.is_none() && job.params.continue_seeds.is_empty() {
            return Some(Outcome::Succeeded);
        }
        // What the pipeline draws, in drawing (= position) order: the frames not done yet and,
        // as context only (drawn again with their seed, not stored: rows still `done`), frames
        // this job stored on an earlier turn or attempt whose frame was deleted since, taking
        // the image the later frames look at with it. An uninterrupted run kept that image in
        // memory; a resumed one has to draw it again.
        let todo: Vec<&JobFrameRow> = match last {
            None => Vec::new(),
            Some(last) => job
                .frames
                .iter()
                .filter(|f| f.state != "done" || (f.frame_id.is_none() && f.position < last))
                .collect(),
        };
        let (story, existing) = match self.inputs(job, &todo) {
            Ok(inputs) => inputs,
            Err(e) => return Some(Outcome::Failed(format!("{e:#}"))),
        };
        let requests: Vec<FrameRequest> = todo
            .iter()
            .map(|f| FrameRequest {
                index: f.position as usize,
                seed: f.seed as u64,
            })
            .collect();
        let options = GenerateOptions {
            capture_attention: self.capture_attention,
            preview_every: self.preview_every,
            ..options(pipeline.default_options(), job)
        };
        let state = RefCell::new(Drawing {
            done: job.frames.len() - left,
            total: job.frames.len() + job.params.continue_seeds.len(),
            steps: job.params.steps as usize,
            last_stored_progress: Instant::now(),
            last_poll: Instant::now(),
            gone: false,
            error: None,
            handing_over: false,
            last_step_at: None,
        });
        let mut on_event = |event: PipelineEvent<'_>| self.on_event(job, &todo, &state, event);
        let cancel = || self.should_stop(job, &state);
        let result = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
            let outputs = if requests.is_empty() {
                Vec::new()
            } else {
                pipeline.generate(
                    &story,
                    &requests,
                    &existing,
                    &options,
                    &mut on_event,
                    &cancel,
                )?
            };
            if !job.params.continue_seeds.is_empty() {
                self.continue_story(pipeline, job, story, existing, outputs, &options, &state)?;
            }
            Ok(())
        }));
        let state = state.into_inner();
        if state.gone {
            return None;
        }
        if let Some(error) = state.error {
            return Some(Outcome::Failed(format!(
                "could not record the job's progress: {error}"
            )));
        }
        Some(match result {
            Ok(Ok(_)) => Outcome::Succeeded,
            Ok(Err(e)) if models::char_ldm::is_cancelled(&e) => {
                if self.stopping() {
                    Outcome::Requeued {
                        reason: "the server is shutting down; the job resumes when it starts again"
                            .into(),
                        counts: false,
                    }
                } else if state.handing_over {
                    // A client's cancel that arrived meanwhile still wins: `finish` turns a
                    // requeue of a job whose cancellation was asked for into a cancel.
                    Outcome::Requeued {
                        reason: TURN_REASON.into(),
                        counts: false,
                    }
                } else {
                    Outcome::Cancelled(None)
                }
            }
            Ok(Err(e)) => Outcome::Failed(format!("{e:#}")),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(job = job.job_id, %message, "the model panicked");
                Outcome::Failed(format!("the model crashed: {message}"))
            }
        })
    }

    /// Story continuation, after the job's other frames: the LLM writes each new caption
    /// after looking at every frame so far ([`StoryPipeline::next_caption`], top-p 0.9 with
    /// the new frame's seed), the caption is stored as a new frame of the story and of the job
    /// ([`store::add_continuation`]), and the frame is drawn and stored like any other before
    /// the next caption is written.
    #[allow(clippy::too_many_arguments)]
    fn continue_story(
        &self,
        pipeline: &StoryPipeline,
        job: &Claimed,
        mut story: StoryInput,
        existing: Vec<Option<image::RgbImage>>,
        outputs: Vec<models::pipeline::FrameOutput>,
        options: &GenerateOptions,
        state: &RefCell<Drawing>,
    ) -> anyhow::Result<()> {
        let mut images = existing;
        images.resize(story.captions.len(), None);
        for output in outputs {
            if let Some(slot) = images.get_mut(output.index) {
                *slot = Some(output.image);
            }
        }
        for (position, slot) in images.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let missing = || {
                format!(
                    "frame {} has no image for the model to continue the story from; draw it first",
                    position + 1
                )
            };
            let bytes = self
                .block_on(store::frame_image(
                    &self.pool,
                    job.params.frame_ids[position],
                ))?
                .with_context(missing)?;
            *slot = Some(
                image::load_from_memory(&bytes)
                    .with_context(missing)?
                    .to_rgb8(),
            );
        }
        let mut job = job.clone();
        while let Some(&seed) = job.params.continue_seeds.first() {
            if self.should_stop(&job, state) {
                return Err(anyhow::Error::new(models::char_ldm::Cancelled));
            }
            let frames: Vec<image::RgbImage> = images.iter().flatten().cloned().collect();
            let decoding = Decoding::TopP {
                p: 0.9,
                temperature: 1.0,
                seed,
            };
            let written = pipeline.next_caption(&story, &frames, decoding, 32)?;
            let caption = continuation_caption(&written, story.captions.len() + 1);
            let added = match self.block_on(store::add_continuation(&self.pool, &job, &caption)) {
                Ok(Some(added)) => added,
                Ok(None) => {
                    state.borrow_mut().gone = true;
                    return Err(anyhow::Error::new(models::char_ldm::Cancelled));
                }
                Err(e) => anyhow::bail!("could not store the continued story: {e}"),
            };
            tracing::info!(job = job.job_id, caption = %caption, "story continued");
            self.hub.publish(added.event);
            job.params = added.params;
            job.frames.push(added.row.clone());
            story.captions.push(caption);
            images.push(None);
            let index = added.row.position as usize;
            let todo = [&added.row];
            let mut on_event = |event: PipelineEvent<'_>| self.on_event(&job, &todo, state, event);
            let cancel = || self.should_stop(&job, state);
            let drawn = pipeline.generate(
                &story,
                &[FrameRequest {
                    index,
                    seed: added.row.seed as u64,
                }],
                &images,
                options,
                &mut on_event,
                &cancel,
            )?;
            {
                let state = state.borrow();
                if state.gone || state.error.is_some() {
                    return Err(anyhow::Error::new(models::char_ldm::Cancelled));
                }
            }
            images[index] = drawn.into_iter().next().map(|o| o.image);
        }
        Ok(())
    }

    /// The story input (cast with portraits read now) and the images of earlier frames that
    /// the drawn frames look at.
    fn inputs(
        &self,
        job: &Claimed,
        todo: &[&JobFrameRow],
    ) -> anyhow::Result<(StoryInput, Vec<Option<image::RgbImage>>)> {
        let params = &job.params;
        let ids: Vec<i64> = params.characters.iter().map(|c| c.id).collect();
        let portraits = self.block_on(store::portraits(&self.pool, &ids))?;
        let mut characters = Vec::with_capacity(ids.len());
        for (member, portrait) in params.characters.iter().zip(portraits) {
            let bytes = portrait.with_context(|| {
                format!(
                    "character {} ({}) was deleted after the job was queued; queue it again",
                    member.id, member.name
                )
            })?;
            let image = image::load_from_memory(&bytes)
                .with_context(|| format!("the portrait of {} does not decode", member.name))?
                .to_rgb8();
            characters.push(CharacterInput {
                name: member.name.clone(),
                pronoun: member.pronoun.clone(),
                portrait: Some(image),
            });
        }
        let last = todo.iter().map(|f| f.position as usize).max().unwrap_or(0);
        let mut existing = vec![None; params.captions.len()];
        for (position, slot) in existing.iter_mut().enumerate().take(last) {
            if todo.iter().any(|f| f.position as usize == position) {
                continue;
            }
            let missing = || {
                format!(
                    "frame {} (position {position}) has no image to draw the later frames from; \
                     generate it first",
                    params.frame_ids[position]
                )
            };
            let bytes = self
                .block_on(store::frame_image(&self.pool, params.frame_ids[position]))?
                .with_context(missing)?;
            *slot = Some(
                image::load_from_memory(&bytes)
                    .with_context(missing)?
                    .to_rgb8(),
            );
        }
        Ok((
            StoryInput {
                characters,
                captions: params.captions.clone(),
            },
            existing,
        ))
    }

    fn should_stop(&self, job: &Claimed, state: &RefCell<Drawing>) -> bool {
        if self.stopping()
            || self
                .shared
                .cancels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&job.job_id)
        {
            return true;
        }
        let mut state = state.borrow_mut();
        if state.gone || state.error.is_some() || state.handing_over {
            return true;
        }
        if state.last_poll.elapsed() >= POLL_EVERY {
            state.last_poll = Instant::now();
            match self.block_on(store::held(&self.pool, job)) {
                Ok(Held::Yes { cancel_requested }) => return cancel_requested,
                Ok(Held::Gone | Held::Lost) => {
                    state.gone = true;
                    return true;
                }
                Err(e) => tracing::warn!(job = job.job_id, error = %e, "cannot poll the job"),
            }
        }
        false
    }

    fn on_event(
        &self,
        job: &Claimed,
        todo: &[&JobFrameRow],
        state: &RefCell<Drawing>,
        event: PipelineEvent<'_>,
    ) {
        let mut state = state.borrow_mut();
        if state.gone || state.error.is_some() {
            return;
        }
        let frame_of = |ordinal: usize| todo[ordinal.saturating_sub(1).min(todo.len() - 1)];
        let total = state.total;
        let progress = |row: &JobFrameRow, step: usize, steps: usize, done: usize| Progress {
            frame: row.ordinal as usize,
            frames: total,
            frames_done: done,
            position: row.position as usize,
            frame_id: row.frame_id,
            step,
            steps,
        };
        // Only a frame that cannot be stored fails the job; a lost progress row is logged.
        let mut essential = false;
        let stored = match event {
            PipelineEvent::FrameStarted { ordinal, .. } => {
                // A frame's first step also pays for its conditioning: not a step's time.
                state.last_step_at = None;
                let row = frame_of(ordinal);
                let p = progress(row, 0, state.steps, state.done);
                state.last_stored_progress = Instant::now();
                // A context-only frame (see `draw`) stays `done`; only the progress moves.
                let started = (row.state != "done").then_some(row.ordinal);
                self.block_on(store::progress(&self.pool, job, &p, started))
            }
            PipelineEvent::Step {
                ordinal,
                step,
                steps,
                ..
            } => {
                state.steps = steps;
                let now = Instant::now();
                if let Some(previous) = state.last_step_at.replace(now) {
                    let ms = now.duration_since(previous).as_secs_f64() * 1e3;
                    let old = f64::from_bits(self.shared.step_ms.load(Ordering::Relaxed));
                    let new = if old > 0.0 { 0.8 * old + 0.2 * ms } else { ms };
                    self.shared.step_ms.store(new.to_bits(), Ordering::Relaxed);
                }
                let p = progress(frame_of(ordinal), step, steps, state.done);
                if state.last_stored_progress.elapsed() < PROGRESS_EVERY {
                    let data = serde_json::to_value(&p).unwrap_or_default();
                    self.hub.publish(JobEvent::new(
                        job.job_id,
                        job.story_id,
                        kind::PROGRESS,
                        data,
                    ));
                    return;
                }
                state.last_stored_progress = Instant::now();
                self.block_on(store::progress(&self.pool, job, &p, None))
            }
            PipelineEvent::Preview {
                ordinal,
                step,
                steps,
                image,
                ..
            } => {
                // Live only: a viewer who joins later sees the stored frames, not old previews.
                let row = frame_of(ordinal);
                match encode_png(image) {
                    Ok(png) => {
                        use base64::Engine;
                        let url = format!(
                            "data:image/png;base64,{}",
                            base64::engine::general_purpose::STANDARD.encode(png)
                        );
                        self.hub.publish(JobEvent::new(
                            job.job_id,
                            job.story_id,
                            kind::PREVIEW,
                            serde_json::json!({
                                "position": row.position,
                                "frame_id": row.frame_id,
                                "step": step,
                                "steps": steps,
                                "image": url,
                            }),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(job = job.job_id, error = %e, "cannot encode a preview")
                    }
                }
                return;
            }
            PipelineEvent::FrameFinished { ordinal, frame, .. } => {
                let row = frame_of(ordinal);
                if row.state == "done" {
                    // Drawn again as context only: stored already, its frame deleted.
                    return;
                }
                let png = match encode_png(&frame.image) {
                    Ok(png) => png,
                    Err(e) => {
                        state.error = Some(format!("cannot encode the frame as PNG: {e}"));
                        return;
                    }
                };
                let attention = match encode_attention(&frame.attention) {
                    Ok(maps) => maps,
                    Err(e) => {
                        state.error = Some(format!("cannot encode an attention map as PNG: {e}"));
                        return;
                    }
                };
                state.done += 1;
                let p = progress(row, state.steps, state.steps, state.done);
                essential = true;
                let finished = FinishedFrame {
                    ordinal: row.ordinal,
                    png,
                    duration_ms: frame.duration.as_millis() as i64,
                    attention,
                };
                self.block_on(store::frame_done(&self.pool, job, &finished, &p))
            }
        };
        match stored {
            Ok(Some(event)) => {
                self.hub.publish(event);
                // Between two frames of the job (the pipeline polls `should_stop` before it
                // starts the next one): the moment to let another story's job go first.
                if essential && state.done < state.total {
                    match self.block_on(store::other_story_waiting(&self.pool, job.story_id)) {
                        Ok(waiting) => state.handing_over = waiting,
                        // Not knowing only costs fairness: the job keeps its turn.
                        Err(e) => {
                            tracing::warn!(job = job.job_id, error = %e, "cannot look at the queue")
                        }
                    }
                }
            }
            Ok(None) => {
                // The job stopped running under us: its story was deleted, or its lease ran
                // out and it went back to the queue.
                if !matches!(
                    self.block_on(store::held(&self.pool, job)),
                    Ok(Held::Yes { .. })
                ) {
                    state.gone = true;
                }
            }
            Err(e) if essential => state.error = Some(e.to_string()),
            Err(e) => tracing::warn!(job = job.job_id, error = %e, "cannot record progress"),
        }
    }
}

/// The model's defaults with the job's steps, guidance and sampler; delayed conditioning keeps
/// its share of the steps (`with_steps`).
fn options(defaults: GenerateOptions, job: &Claimed) -> GenerateOptions {
    let scheduler = job
        .params
        .scheduler
        .as_deref()
        // Checked when queued; a name this build no longer knows falls back to the model's.
        .and_then(|s| s.parse().ok())
        .unwrap_or(defaults.scheduler);
    // Checked against the model's sizes when queued.
    let (width, height) = match (job.params.width, job.params.height) {
        (Some(width), Some(height)) => (width as usize, height as usize),
        _ => (defaults.width, defaults.height),
    };
    GenerateOptions {
        guidance_scale: job.params.guidance_scale,
        scheduler,
        negative_prompt: job.params.negative_prompt.clone(),
        width,
        height,
        ..defaults.with_steps(job.params.steps as usize)
    }
}

/// A caption the LLM wrote, as a caption the story can keep: an empty or otherwise unusable
/// one (an untrained model may stop at once) becomes a marker, so the story still goes on.
fn continuation_caption(written: &str, number: usize) -> String {
    // A caption cut at the token limit can end inside a character, which decodes as U+FFFD.
    let written = written.trim_end_matches('\u{FFFD}');
    crate::validate::caption(written)
        .unwrap_or_else(|_| format!("(frame {number}: the model wrote no usable caption)"))
}

fn encode_png<P: image::PixelWithColorType>(
    image: &image::ImageBuffer<P, Vec<P::Subpixel>>,
) -> image::ImageResult<Vec<u8>>
where
    [P::Subpixel]: image::EncodableLayout,
{
    let mut out = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

fn encode_attention(
    maps: &[models::pipeline::AttentionMap],
) -> image::ImageResult<Vec<AttentionPng>> {
    maps.iter()
        .map(|m| {
            Ok(AttentionPng {
                text: m.text.clone(),
                characters: m.characters.clone(),
                png: encode_png(&m.heatmap)?,
            })
        })
        .collect()
}
