//! The model thread: requests queue up, and whatever arrived within a short window (up to a
//! maximum batch) runs as one padded forward per model, off the async runtime's threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use masklm_data::{MaskVocab, MlmTokenizer};
use masklm_model::{RobertaConfig, RobertaForMaskedLM};
use masklm_train::fill::{FillText, mask_probabilities, pipeline_output};
use serde_json::Value;
use tokio::sync::oneshot;

/// A model's read-only facts, shared with the request handlers.
pub struct ModelInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    pub config: RobertaConfig,
    pub tokenizer: MlmTokenizer,
    pub vocab: MaskVocab,
    pub parameters: usize,
}

/// One request's work.
pub enum Job {
    /// Distributions at the masks of `texts`, answered as the pipeline's JSON (one per text).
    Fill {
        model: usize,
        texts: Vec<FillText>,
        top_k: usize,
        targets: Option<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<Value>, String>>,
    },
    /// Pseudo-log-likelihood and scored-token count of each sequence.
    Score {
        model: usize,
        texts: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<(f64, u64)>, String>>,
    },
}

impl Job {
    fn sequences(&self) -> usize {
        match self {
            Job::Fill { texts, .. } => texts.len(),
            Job::Score { texts, .. } => texts.len(),
        }
    }
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
    /// drained.
    pub fn start(
        models: Vec<RobertaForMaskedLM>,
        infos: Arc<Vec<ModelInfo>>,
        batching: Batching,
        device: Device,
    ) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
        let (sender, receiver) = sync_channel(batching.queue.max(1));
        let arriving = Arc::new(AtomicUsize::new(0));
        let waiting_for = arriving.clone();
        let handle = std::thread::Builder::new()
            .name("masklm-model".to_string())
            .spawn(move || run(models, infos, batching, device, receiver, waiting_for))?;
        Ok((Engine { sender, arriving }, handle))
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
        })
    }
}

fn run(
    models: Vec<RobertaForMaskedLM>,
    infos: Arc<Vec<ModelInfo>>,
    batching: Batching,
    device: Device,
    receiver: Receiver<Job>,
    arriving: Arc<AtomicUsize>,
) {
    while let Ok(first) = receiver.recv() {
        let mut jobs = vec![first];
        let mut sequences = jobs[0].sequences();
        let deadline = Instant::now() + batching.window;
        while sequences < batching.max_batch {
            let next = match receiver.try_recv() {
                Ok(job) => Ok(job),
                Err(TryRecvError::Disconnected) => break,
                // Wait only for requests already on their way, and only within the window.
                Err(TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if arriving.load(Ordering::SeqCst) == 0 || left.is_zero() {
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
        for (index, model) in models.iter().enumerate() {
            let info = &infos[index];
            let (fills, scores): (Vec<Job>, Vec<Job>) = jobs
                .extract_if(.., |job| match job {
                    Job::Fill { model, .. } | Job::Score { model, .. } => *model == index,
                })
                .partition(|job| matches!(job, Job::Fill { .. }));
            if !fills.is_empty() {
                run_fills(model, info, fills, batching.max_batch, &device);
            }
            for job in scores {
                run_score(model, info, job, batching.max_batch, &device);
            }
        }
    }
}

/// Runs the fill jobs of one model as padded batches of at most `max_batch` sequences.
fn run_fills(
    model: &RobertaForMaskedLM,
    info: &ModelInfo,
    jobs: Vec<Job>,
    max_batch: usize,
    device: &Device,
) {
    let texts: Vec<&FillText> = jobs
        .iter()
        .flat_map(|job| match job {
            Job::Fill { texts, .. } => texts.iter().collect(),
            Job::Score { .. } => Vec::new(),
        })
        .collect();
    let computed = catch_panic(|| {
        let mut rows = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(max_batch.max(1)) {
            let ids: Vec<&[u32]> = chunk.iter().map(|t| t.ids.as_slice()).collect();
            let masks: Vec<Vec<usize>> = chunk.iter().map(|t| t.masks.clone()).collect();
            rows.extend(mask_probabilities(
                model,
                &ids,
                &masks,
                info.tokenizer.pad_id,
                device,
            )?);
        }
        Ok::<_, masklm_train::TrainError>(rows)
    });
    let mut rows = match computed {
        Ok(Ok(rows)) => Some(rows.into_iter()),
        Ok(Err(e)) => {
            reply_all(jobs, &e.to_string());
            return;
        }
        Err(panic) => {
            reply_all(jobs, &format!("the model failed: {panic}"));
            return;
        }
    };
    for job in jobs {
        let Job::Fill {
            texts,
            top_k,
            targets,
            reply,
            ..
        } = job
        else {
            continue;
        };
        let docs = texts
            .iter()
            .map(|text| {
                let rows = rows.as_mut().and_then(Iterator::next).unwrap_or_default();
                pipeline_output(&info.tokenizer, text, &rows, top_k, targets.as_deref())
            })
            .collect();
        // The client may have gone (timeout, disconnect): nothing to answer then.
        let _ = reply.send(Ok(docs));
    }
}

fn run_score(
    model: &RobertaForMaskedLM,
    info: &ModelInfo,
    job: Job,
    max_batch: usize,
    device: &Device,
) {
    let Job::Score { texts, reply, .. } = job else {
        return;
    };
    let computed = catch_panic(|| {
        texts
            .iter()
            .map(|ids| {
                masklm_train::pseudo_log_likelihood(model, ids, &info.vocab, max_batch, device)
            })
            .collect::<Vec<_>>()
    });
    let _ = reply.send(computed.map_err(|panic| format!("the model failed: {panic}")));
}

fn reply_all(jobs: Vec<Job>, message: &str) {
    for job in jobs {
        match job {
            Job::Fill { reply, .. } => {
                let _ = reply.send(Err(message.to_string()));
            }
            Job::Score { reply, .. } => {
                let _ = reply.send(Err(message.to_string()));
            }
        }
    }
}

/// Runs `f`, turning a panic (a backend failure) into its message for a 500. Not
/// `masklm_train::catch_backend_panic`: its quiet hook silences every thread's panic message
/// while inside it, and the model thread is inside for every batch.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".to_string())
    })
}
