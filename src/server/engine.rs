//! Slots and the queue: one thread runs the model for one request at a time.
//!
//! A slot is a [`Session`]: its KV cache keeps the tokens of the last request it ran. The
//! model has one set of buffers and batch-1 methods, so requests take turns at it. A
//! request taken from the queue goes to the slot whose cache its prompt continues (see
//! [`choose`]), so a client that resends its conversation feeds only what is new; more
//! slots keep more conversations' caches.
//! Requests wait in a bounded queue; a full queue refuses new ones.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::ApiError;
use super::metrics::Metrics;
use crate::config::GenerationConfig;
use crate::generate::StopHandle;
use crate::session::Session;
use crate::stats::{Stats, StopReason};

/// What the engine tells a request's handler.
#[derive(Debug)]
pub(crate) enum Event {
    /// Generated text.
    Text(String),
    /// The end: the generation's stats, or why it failed.
    Done(Result<Stats, ApiError>),
}

/// A request's cancellation flag.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    cancelled: AtomicBool,
}

impl Ticket {
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// A request for the model: its prompt as token ids (the whole conversation) and settings.
pub(crate) struct Job {
    pub ids: Vec<u32>,
    /// A prompt with images, as the input list it runs as (`ids` then holds
    /// `MEDIA_POSITION` for the images' rows).
    pub inputs: Option<Vec<crate::Input>>,
    pub config: GenerationConfig,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    ticket: Arc<Ticket>,
}

/// Held by a request's handler: dropping it (the client went away) cancels the request,
/// whether it is waiting or generating.
pub(crate) struct JobGuard {
    engine: Arc<Engine>,
    ticket: Arc<Ticket>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.engine.cancel(&self.ticket);
    }
}

struct Queue {
    jobs: VecDeque<Job>,
    /// No new requests: the server is shutting down.
    closed: bool,
}

/// One slot: a session and when it last ran.
struct Slot {
    session: Session,
    last_used: u64,
}

/// The queue, the running request's stop handle and the thread that runs the model.
pub(crate) struct Engine {
    queue: Mutex<Queue>,
    wake: Condvar,
    capacity: usize,
    running: Mutex<Option<(u64, StopHandle)>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a request was not queued.
pub(crate) fn shutting_down() -> ApiError {
    ApiError::server(
        503,
        "the server is shutting down",
        Some("server_shutting_down"),
    )
}

impl Engine {
    /// Starts the thread that runs requests on `sessions` (the slots), with room for
    /// `capacity` waiting requests.
    pub fn start(
        sessions: Vec<Session>,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Engine>> {
        let engine = Arc::new(Engine {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            capacity,
            running: Mutex::new(None),
            next_id: AtomicU64::new(1),
            metrics,
            thread: Mutex::new(None),
        });
        let slots = sessions
            .into_iter()
            .map(|session| Slot {
                session,
                last_used: 0,
            })
            .collect();
        let worker = engine.clone();
        let handle = std::thread::Builder::new()
            .name("etllm-server-model".into())
            .spawn(move || worker.run(slots))?;
        *lock(&engine.thread) = Some(handle);
        Ok(engine)
    }

    /// Queues a request; the guard cancels it when dropped. A full queue is a 503.
    pub fn submit(
        self: &Arc<Self>,
        (ids, inputs): (Vec<u32>, Option<Vec<crate::Input>>),
        config: GenerationConfig,
        events: UnboundedSender<Event>,
        received: Instant,
    ) -> Result<JobGuard, ApiError> {
        let ticket = Arc::new(Ticket {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cancelled: AtomicBool::new(false),
        });
        let mut queue = lock(&self.queue);
        if queue.closed {
            return Err(shutting_down());
        }
        if queue.jobs.len() >= self.capacity {
            return Err(ApiError::server(
                503,
                format!(
                    "the server is busy: {} requests are waiting already; retry later",
                    queue.jobs.len()
                ),
                Some("queue_full"),
            ));
        }
        queue.jobs.push_back(Job {
            ids,
            inputs,
            config,
            events,
            received,
            ticket: ticket.clone(),
        });
        self.metrics.queue_depth.set(queue.jobs.len() as i64);
        drop(queue);
        self.wake.notify_one();
        Ok(JobGuard {
            engine: self.clone(),
            ticket,
        })
    }

    /// Cancels one request: a waiting one is dropped from the queue, a running one stops
    /// before its next model step.
    fn cancel(&self, ticket: &Ticket) {
        ticket.cancelled.store(true, Ordering::Release);
        {
            let mut queue = lock(&self.queue);
            let before = queue.jobs.len();
            queue.jobs.retain(|job| job.ticket.id != ticket.id);
            if queue.jobs.len() != before {
                self.metrics.cancelled.inc();
                self.metrics.queue_depth.set(queue.jobs.len() as i64);
            }
        }
        if let Some((id, handle)) = lock(&self.running).as_ref() {
            if *id == ticket.id {
                handle.stop();
            }
        }
    }

    /// Waiting requests.
    pub fn queue_depth(&self) -> usize {
        lock(&self.queue).jobs.len()
    }

    /// Whether a request is generating now.
    pub fn busy(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Refuses new requests; the queued and running ones go on.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake.notify_all();
    }

    /// Refuses new requests, answers the waiting ones 503 and stops the running one.
    pub fn cancel_all(&self) {
        let jobs = {
            let mut queue = lock(&self.queue);
            queue.closed = true;
            self.metrics.queue_depth.set(0);
            std::mem::take(&mut queue.jobs)
        };
        for job in jobs {
            job.ticket.cancelled.store(true, Ordering::Release);
            self.metrics.cancelled.inc();
            let _ = job.events.send(Event::Done(Err(shutting_down())));
        }
        if let Some((_, handle)) = lock(&self.running).as_ref() {
            handle.stop();
        }
        self.wake.notify_all();
    }

    /// Waits for the model's thread to end (after [`close`](Self::close) and an empty
    /// queue).
    pub fn join(&self) {
        if let Some(handle) = lock(&self.thread).take() {
            let _ = handle.join();
        }
    }

    /// The model's thread.
    fn run(&self, mut slots: Vec<Slot>) {
        let mut clock = 0u64;
        loop {
            let job = {
                let mut queue = lock(&self.queue);
                loop {
                    if let Some(job) = queue.jobs.pop_front() {
                        self.metrics.queue_depth.set(queue.jobs.len() as i64);
                        break job;
                    }
                    if queue.closed {
                        return;
                    }
                    queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
            };
            clock += 1;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_job(&mut slots, &job, clock)
            }));
            *lock(&self.running) = None;
            self.metrics.busy_slots.set(0);
            let result = match outcome {
                Ok(result) => result,
                Err(_) => Some(Err(ApiError::server(
                    500,
                    "internal error: the generation panicked",
                    None,
                ))),
            };
            if let Some(result) = result {
                let _ = job.events.send(Event::Done(result));
            }
        }
    }

    /// Runs one request on the best slot; `None` when it was cancelled before it started.
    fn run_job(
        &self,
        slots: &mut [Slot],
        job: &Job,
        clock: u64,
    ) -> Option<Result<Stats, ApiError>> {
        self.metrics
            .queue_wait
            .observe(job.received.elapsed().as_secs_f64());
        let index = choose_slot(slots, &job.ids);
        let slot = &mut slots[index];
        slot.last_used = clock;
        *lock(&self.running) = Some((job.ticket.id, slot.session.stop_handle()));
        if job.ticket.is_cancelled() {
            self.metrics.cancelled.inc();
            return None;
        }
        self.metrics.busy_slots.set(1);
        let mut first_token: Option<Instant> = None;
        let on_piece = |piece: crate::TokenPiece<'_>| {
            if job.ticket.is_cancelled() || job.events.is_closed() {
                return ControlFlow::Break(());
            }
            if piece.token.is_some() && first_token.is_none() {
                first_token = Some(Instant::now());
            }
            if !piece.text.is_empty() {
                let _ = job.events.send(Event::Text(piece.text.to_owned()));
            }
            ControlFlow::Continue(())
        };
        let result = match &job.inputs {
            // A prompt with images starts its slot over: the cache holds no images to
            // compare with.
            Some(inputs) => slot.session.reset().and_then(|()| {
                let config = GenerationConfig {
                    reuse_prefix: false,
                    num_bos: 0,
                    ..job.config.clone()
                };
                slot.session
                    .generate_inputs(inputs, &config, on_piece, |_| {})
            }),
            None => slot
                .session
                .generate_from_ids(&job.ids, &job.config, on_piece, |_| {}),
        };
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                // Start the slot over: whatever the failure left in it is not reused.
                let _ = slot.session.reset();
                return Some(Err(ApiError::from_error(&e)));
            }
        };
        let m = &self.metrics;
        m.prompt_tokens.inc_by(stats.num_prompt_tokens);
        m.cached_prompt_tokens.inc_by(stats.reused_prompt_tokens);
        m.generated_tokens.inc_by(stats.num_generated_tokens);
        if let Some(first) = first_token {
            m.time_to_first_token
                .observe((first - job.received).as_secs_f64());
            if stats.num_generated_tokens > 1 {
                let per_token =
                    first.elapsed().as_secs_f64() / (stats.num_generated_tokens - 1) as f64;
                m.time_per_output_token.observe(per_token);
            }
        }
        if matches!(
            stats.stop_reason,
            StopReason::Stopped | StopReason::Callback
        ) {
            m.cancelled.inc();
            // Only a shutdown stops a request whose client is still there.
            return Some(Err(shutting_down()));
        }
        Some(Ok(stats))
    }
}

/// The slot for a prompt of `ids` (see [`choose`]).
fn choose_slot(slots: &[Slot], ids: &[u32]) -> usize {
    let candidates: Vec<Candidate> = slots
        .iter()
        .map(|slot| {
            let tokens = slot.session.tokens();
            Candidate {
                cached: tokens.len(),
                shared: common_prefix(&tokens, ids),
                last_used: slot.last_used,
            }
        })
        .collect();
    choose(&candidates)
}

/// What the choice of a slot looks at.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// Tokens in the slot's cache.
    cached: usize,
    /// How many of them the prompt starts with.
    shared: usize,
    last_used: u64,
}

/// The slot that keeps the most of the prompt among those whose cache the prompt mostly
/// continues (more than half of the cached tokens are the prompt's: the same conversation,
/// resent or edited near its end); when there is none, the least recently used slot (an
/// empty one first). A slot that shares only a system prompt or a chat header with the
/// prompt is not taken from the conversation it holds when another slot is free to lose.
fn choose(candidates: &[Candidate]) -> usize {
    let continued = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.shared > 0 && c.shared * 2 > c.cached)
        .max_by_key(|(_, c)| (c.shared, std::cmp::Reverse(c.last_used)));
    if let Some((i, _)) = continued {
        return i;
    }
    candidates
        .iter()
        .enumerate()
        .min_by_key(|(_, c)| (c.cached > 0, c.last_used))
        .map_or(0, |(i, _)| i)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::{choose, common_prefix, Candidate};

    fn c(cached: usize, shared: usize, last_used: u64) -> Candidate {
        Candidate {
            cached,
            shared,
            last_used,
        }
    }

    #[test]
    fn the_slot_the_prompt_continues_wins() {
        assert_eq!(choose(&[c(50, 10, 1), c(40, 40, 2), c(0, 0, 0)]), 1);
    }

    #[test]
    fn a_shared_header_alone_does_not_take_a_slot_from_its_conversation() {
        // Slot 0 holds another conversation with the same 10-token header; slot 1 is empty.
        assert_eq!(choose(&[c(60, 10, 1), c(0, 0, 0)]), 1);
    }

    #[test]
    fn without_a_continued_slot_the_least_recently_used_goes() {
        assert_eq!(choose(&[c(60, 10, 5), c(70, 10, 3), c(80, 0, 4)]), 1);
    }

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
