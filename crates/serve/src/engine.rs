//! The model thread: requests queue up, and whatever arrived within a short window (up to a
//! maximum batch) runs as one padded forward per model, off the async runtime's threads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use masklm_data::{MaskVocab, MlmTokenizer};
use masklm_infer::fill::{FillText, mask_probabilities, pipeline_output};
use masklm_infer::pseudo_log_likelihood_passes;
use masklm_model::{MaskedLm, ModelConfig};
use serde_json::Value;
use tokio::sync::oneshot;

/// A model's read-only facts, shared with the request handlers.
pub struct ModelInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    pub config: ModelConfig,
    pub tokenizer: MlmTokenizer,
    pub vocab: MaskVocab,
    pub parameters: usize,
}

/// One request's work.
pub enum Job {
    Fill(FillJob),
    Score(ScoreJob),
}

/// Distributions at the masks of `texts`, answered as the pipeline's JSON (one per text).
pub struct FillJob {
    pub model: usize,
    pub texts: Vec<FillText>,
    pub top_k: usize,
    pub targets: Option<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<Value>, String>>,
}

/// Pseudo-log-likelihood and scored-token count of each sequence.
pub struct ScoreJob {
    pub model: usize,
    pub texts: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<(f64, u64)>, String>>,
}

impl Job {
    fn sequences(&self) -> usize {
        match self {
            Job::Fill(job) => job.texts.len(),
            Job::Score(job) => job.texts.len(),
        }
    }

    fn model(&self) -> usize {
        match self {
            Job::Fill(job) => job.model,
            Job::Score(job) => job.model,
        }
    }
}

/// What the model thread has done with the jobs it took, as `/healthz` shows it.
#[derive(Debug, Default)]
pub struct JobCounts {
    /// Jobs accepted into the queue.
    pub received: AtomicU64,
    /// Jobs run to the end (answered, or failed with a 500).
    pub finished: AtomicU64,
    /// Jobs whose client left (timed out, disconnected) before the answer: the rest of their
    /// work was skipped.
    pub abandoned: AtomicU64,
}

/// How requests are batched.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most sequences in one forward; 1 turns batching off.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for requests that are on their way (read
    /// and being tokenized by the HTTP side). With none on their way it does not wait, so a
    /// lone client pays no window.
    pub window: Duration,
    /// Requests waiting beyond the one running; more are refused (503).
    pub queue: usize,
}

/// The handle the HTTP side submits jobs through.
#[derive(Clone)]
pub struct Engine {
    sender: SyncSender<Job>,
    arriving: Arc<AtomicUsize>,
    counts: Arc<JobCounts>,
}

/// Marks a request as on its way to the model thread until dropped (see [`Batching::window`]).
pub struct Arriving(Arc<AtomicUsize>);

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why a job was not accepted.
pub enum Submit {
    /// The queue is full.
    Busy,
    /// The model thread has stopped.
    Stopped,
}

impl Engine {
    /// Starts the model thread. It ends once every `Engine` clone is dropped and the queue is
    /// drained. `max_masks`: most masked positions whose distributions one forward holds (each
    /// is a vocabulary-sized row of floats), however many requests were batched together.
    pub fn start(
        models: Vec<MaskedLm>,
        infos: Arc<Vec<ModelInfo>>,
        batching: Batching,
        max_masks: usize,
        device: Device,
    ) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
        let (sender, receiver) = sync_channel(batching.queue.max(1));
        let engine = Engine {
            sender,
            arriving: Arc::new(AtomicUsize::new(0)),
            counts: Arc::new(JobCounts::default()),
        };
        let thread = ModelThread {
            models,
            infos,
            batching,
            max_masks: max_masks.max(1),
            device,
            arriving: engine.arriving.clone(),
            counts: engine.counts.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("masklm-model".to_string())
            .spawn(move || thread.run(receiver))?;
        Ok((engine, handle))
    }

    /// Announces a request that will submit a job soon.
    pub fn arriving(&self) -> Arriving {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arriving(self.arriving.clone())
    }

    pub fn submit(&self, job: Job) -> Result<(), Submit> {
        self.sender.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => Submit::Busy,
            TrySendError::Disconnected(_) => Submit::Stopped,
        })?;
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// What the model thread has done so far.
    pub fn counts(&self) -> &JobCounts {
        &self.counts
    }
}

/// Everything the model thread owns.
struct ModelThread {
    models: Vec<MaskedLm>,
    infos: Arc<Vec<ModelInfo>>,
    batching: Batching,
    max_masks: usize,
    device: Device,
    arriving: Arc<AtomicUsize>,
    counts: Arc<JobCounts>,
}

impl ModelThread {
    fn run(self, receiver: Receiver<Job>) {
        while let Ok(first) = receiver.recv() {
            let mut jobs = self.collect(first, &receiver);
            for (index, model) in self.models.iter().enumerate() {
                let worker = Worker {
                    model,
                    info: &self.infos[index],
                    max_batch: self.batching.max_batch.max(1),
                    max_masks: self.max_masks,
                    device: &self.device,
                    counts: &self.counts,
                };
                let (mut fills, mut scores) = (Vec::new(), Vec::new());
                for job in jobs.extract_if(.., |job| job.model() == index) {
                    match job {
                        Job::Fill(job) => fills.push(job),
                        Job::Score(job) => scores.push(job),
                    }
                }
                // Fills first: one forward each, where a score may be hundreds.
                if !fills.is_empty() {
                    worker.fills(fills);
                }
                for job in scores {
                    worker.score(job);
                }
            }
        }
    }

    /// `first` and the jobs that arrive with it, up to a batch.
    fn collect(&self, first: Job, receiver: &Receiver<Job>) -> Vec<Job> {
        let mut jobs = vec![first];
        let mut sequences = jobs[0].sequences();
        let deadline = Instant::now() + self.batching.window;
        while sequences < self.batching.max_batch {
            let next = match receiver.try_recv() {
                Ok(job) => Ok(job),
                Err(TryRecvError::Disconnected) => break,
                // Wait only for requests already on their way, and only within the window.
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if self.arriving.load(Ordering::SeqCst) == 0 || left.is_zero() {
                        break;
                    }
                    receiver.recv_timeout(left.min(Duration::from_micros(200)))
                }
            };
            match next {
                Ok(job) => {
                    sequences += job.sequences();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        jobs
    }
}

/// One model's share of a batch.
struct Worker<'a> {
    model: &'a MaskedLm,
    info: &'a ModelInfo,
    max_batch: usize,
    max_masks: usize,
    device: &'a Device,
    counts: &'a JobCounts,
}

/// A fill job being worked on: its answers so far. `reply` is taken once the job is answered
/// (an error) or its client is found gone, after which it gets no more work.
struct Pending {
    texts: Vec<FillText>,
    top_k: usize,
    targets: Option<Vec<u32>>,
    reply: Option<oneshot::Sender<Result<Vec<Value>, String>>>,
    docs: Vec<Value>,
}

impl Pending {
    /// Whether this job still wants work; notices (and counts) a client that has left.
    fn wanted(&mut self, counts: &JobCounts) -> bool {
        match &self.reply {
            Some(reply) if reply.is_closed() => {
                self.reply = None;
                counts.abandoned.fetch_add(1, Ordering::Relaxed);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    fn answer(&mut self, answer: Result<Vec<Value>, String>, counts: &JobCounts) {
        if let Some(reply) = self.reply.take() {
            counts.finished.fetch_add(1, Ordering::Relaxed);
            // The client may have gone since its last batch: nothing to answer then.
            let _ = reply.send(answer);
        }
    }
}

impl Worker<'_> {
    /// Runs fill jobs as padded batches of at most `max_batch` texts and `max_masks` masks,
    /// skipping the texts of jobs whose client has left by the time their batch comes.
    fn fills(&self, jobs: Vec<FillJob>) {
        let mut queue: VecDeque<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.texts.len()).map(move |t| (j, t)))
            .collect();
        let mut pending: Vec<Pending> = jobs
            .into_iter()
            .map(|job| Pending {
                docs: Vec::with_capacity(job.texts.len()),
                texts: job.texts,
                top_k: job.top_k,
                targets: job.targets,
                reply: Some(job.reply),
            })
            .collect();
        loop {
            let chunk = self.next_chunk(&mut queue, &mut pending);
            if chunk.is_empty() {
                break;
            }
            self.fill_chunk(&chunk, &mut pending);
        }
        for p in &mut pending {
            let docs = std::mem::take(&mut p.docs);
            p.answer(Ok(docs), self.counts);
        }
    }

    /// The next (job, text) pairs to run together, dropping those of jobs no longer wanted.
    fn next_chunk(
        &self,
        queue: &mut VecDeque<(usize, usize)>,
        pending: &mut [Pending],
    ) -> Vec<(usize, usize)> {
        let mut chunk = Vec::new();
        let mut masks = 0;
        while let Some(&(j, t)) = queue.front() {
            if !pending[j].wanted(self.counts) {
                queue.pop_front();
                continue;
            }
            let more = pending[j].texts[t].masks.len();
            let fits = masks + more <= self.max_masks;
            if chunk.len() == self.max_batch || (!chunk.is_empty() && !fits) {
                break;
            }
            masks += more;
            chunk.push((j, t));
            queue.pop_front();
        }
        chunk
    }

    /// One padded forward over `chunk`; each text's answer goes to its job, or the error to
    /// every job in the chunk.
    fn fill_chunk(&self, chunk: &[(usize, usize)], pending: &mut [Pending]) {
        let texts: Vec<&FillText> = chunk.iter().map(|&(j, t)| &pending[j].texts[t]).collect();
        let ids: Vec<&[u32]> = texts.iter().map(|t| t.ids.as_slice()).collect();
        let masks: Vec<Vec<usize>> = texts.iter().map(|t| t.masks.clone()).collect();
        let computed = catch_panic(|| {
            mask_probabilities(
                self.model,
                &ids,
                &masks,
                self.info.tokenizer.pad_id,
                self.device,
            )
        });
        let rows = match computed {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return self.fail(chunk, pending, &e.to_string()),
            Err(panic) => return self.fail(chunk, pending, &format!("the model failed: {panic}")),
        };
        for (&(j, t), rows) in chunk.iter().zip(rows) {
            let p = &mut pending[j];
            let doc = pipeline_output(
                &self.info.tokenizer,
                &p.texts[t],
                &rows,
                p.top_k,
                p.targets.as_deref(),
            );
            p.docs.push(doc);
        }
    }

    fn fail(&self, chunk: &[(usize, usize)], pending: &mut [Pending], message: &str) {
        for &(j, _) in chunk {
            pending[j].answer(Err(message.to_string()), self.counts);
        }
    }

    /// Pseudo-log-likelihood of each text, stopping between forward passes once the client
    /// has left: one text of 512 tokens is 512 masked copies.
    fn score(&self, job: ScoreJob) {
        let computed = catch_panic(|| {
            let mut scores = Vec::with_capacity(job.texts.len());
            for ids in &job.texts {
                let mut passes = pseudo_log_likelihood_passes(
                    self.model,
                    ids,
                    &self.info.vocab,
                    self.max_batch,
                    self.device,
                );
                let (mut sum, mut n) = (0.0, 0);
                loop {
                    if job.reply.is_closed() {
                        return None;
                    }
                    let Some((ll, k)) = passes.next() else { break };
                    sum += ll;
                    n += k;
                }
                scores.push((sum, n));
            }
            Some(scores)
        });
        let answer = match computed {
            Ok(Some(scores)) => Ok(scores),
            Ok(None) => {
                self.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(panic) => Err(format!("the model failed: {panic}")),
        };
        self.counts.finished.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(answer);
    }
}

/// Runs `f`, turning a panic (a backend failure) into its message for a 500. Not the CLI's
/// device probe (`masklm_train::catch_backend_panic`): its quiet hook silences every thread's
/// panic message while inside it, and the model thread is inside for every batch.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".to_string())
    })
}
