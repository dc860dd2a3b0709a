//! The session stream to the destination and its flow control: frames go
//! through a small bounded queue, and no more than a window of them may be
//! on their way (sent, not yet read by the destination). The kernel's
//! socket buffers would otherwise hold seconds of data, which QEMU cannot
//! see and which the last pages would queue behind while the VM is stopped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudlet_api::HandoffLoaded;
use tokio::sync::{mpsc, OnceCell};

use crate::handoff::peer::Peer;
use crate::handoff::{AbortOnDrop, HandoffError};

/// Frames in flight between the migration reader and the network.
pub(super) const SEND_QUEUE: usize = 4;
/// How often the source asks the destination how much has arrived.
const FLOW_POLL: Duration = Duration::from_millis(40);
/// Smallest window of session bytes in flight...
const MIN_WINDOW: u64 = 256 * 1024;
/// ...otherwise this much time at the measured link rate.
const WINDOW_TIME: Duration = Duration::from_millis(200);

/// Application-level flow control of the session stream.
#[derive(Default)]
pub(super) struct FlowWindow {
    received: AtomicU64,
    window: AtomicU64,
}

impl FlowWindow {
    pub(super) fn set_window(&self, wire_bytes_per_sec: f64) {
        let w = (wire_bytes_per_sec * WINDOW_TIME.as_secs_f64()) as u64;
        self.window.store(w.max(MIN_WINDOW), Ordering::Relaxed);
    }

    async fn wait_for_room(&self, sent: u64) {
        // Bounded: a destination that stops answering the poll must not
        // stall the stream for ever (the stream has its own timeouts).
        for _ in 0..500 {
            let window = self.window.load(Ordering::Relaxed).max(MIN_WINDOW);
            if sent.saturating_sub(self.received.load(Ordering::Relaxed)) <= window {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Where frames of the session are queued (cheap to clone).
#[derive(Clone)]
pub(super) struct FrameSender(mpsc::Sender<Bytes>);

impl FrameSender {
    pub(super) async fn send(&self, frame: Vec<u8>) -> Result<(), HandoffError> {
        self.0
            .send(Bytes::from(frame))
            .await
            .map_err(|_| HandoffError::StoppedReading { why: None })
    }

    pub(super) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// One session to the destination: the upload and what is known of it.
pub(super) struct Session {
    frames: Option<FrameSender>,
    /// Session bytes handed to the HTTP body so far.
    pub(super) sent: Arc<AtomicU64>,
    pub(super) flow: Arc<FlowWindow>,
    poller: Option<AbortOnDrop<()>>,
    /// The destination's answer to the stream.
    upload: Option<tokio::task::JoinHandle<Result<HandoffLoaded, HandoffError>>>,
}

impl Session {
    /// Start the upload (`POST /v1/handoff/{id}/stream`) and the poller
    /// that tells the flow window how much the destination has read.
    pub(super) fn open(peer: &Peer, refusal: Arc<OnceCell<String>>) -> Self {
        let (tx, rx) = mpsc::channel::<Bytes>(SEND_QUEUE);
        let sent = Arc::new(AtomicU64::new(0));
        let flow = Arc::new(FlowWindow::default());
        let body = {
            let (counter, flow) = (sent.clone(), flow.clone());
            futures::stream::unfold(rx, move |mut rx| {
                let (counter, flow) = (counter.clone(), flow.clone());
                async move {
                    let b = rx.recv().await?;
                    flow.wait_for_room(counter.load(Ordering::Relaxed)).await;
                    counter.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Some((Ok::<_, std::io::Error>(b), rx))
                }
            })
        };
        let poller = {
            let (flow, peer) = (flow.clone(), peer.clone());
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    if let Some(r) = peer.received().await {
                        flow.received.store(r, Ordering::Relaxed);
                    }
                    tokio::time::sleep(FLOW_POLL).await;
                }
            }))
        };
        let upload = {
            let (peer, refusal) = (peer.clone(), refusal.clone());
            tokio::spawn(async move {
                let r = peer.stream(body).await;
                if let Err(e) = &r {
                    let _ = refusal.set(e.to_string());
                }
                r
            })
        };
        Self {
            frames: Some(FrameSender(tx)),
            sent,
            flow,
            poller: Some(poller),
            upload: Some(upload),
        }
    }

    /// A sender of frames (for the migration reader).
    pub(super) fn frames(&self) -> Result<FrameSender, HandoffError> {
        self.frames
            .clone()
            .ok_or(HandoffError::StoppedReading { why: None })
    }

    pub(super) async fn send(&self, frame: Vec<u8>) -> Result<(), HandoffError> {
        self.frames()?.send(frame).await
    }

    pub(super) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sent and not yet read by the destination, as last polled.
    pub(super) fn in_flight(&self) -> u64 {
        self.sent()
            .saturating_sub(self.flow.received.load(Ordering::Relaxed))
    }

    /// The queue is full: the link, not the encoder, sets the pace.
    pub(super) fn queue_full(&self) -> bool {
        self.frames.as_ref().is_some_and(|f| f.0.capacity() == 0)
    }

    /// No frame waits in the queue.
    pub(super) fn queue_empty(&self) -> bool {
        self.frames
            .as_ref()
            .is_none_or(|f| f.0.capacity() == SEND_QUEUE)
    }

    /// No more frames from here (the reader holds its own sender: the body
    /// ends when it is done too).
    pub(super) fn finish_sending(&mut self) {
        self.frames = None;
    }

    /// The flow window's poller stops (the stream's tail has crossed, or
    /// the handoff ended).
    pub(super) fn stop_polling(&mut self) {
        self.poller = None;
    }

    /// The destination's answer to the stream, if it comes within `wait`.
    pub(super) async fn answer(
        &mut self,
        wait: Duration,
    ) -> Option<Result<HandoffLoaded, HandoffError>> {
        let upload = self.upload.take()?;
        match tokio::time::timeout(wait, upload).await {
            Ok(Ok(r)) => Some(r),
            _ => None,
        }
    }
}

/// A stream error says only that the destination stopped reading; its
/// answer (if it comes within a moment) says why. `refusal`: the
/// destination's refusal, kept by the upload for the error report.
pub(super) async fn with_refusal(err: HandoffError, refusal: &OnceCell<String>) -> HandoffError {
    if !matches!(&err, HandoffError::StoppedReading { why: None }) {
        return err;
    }
    for _ in 0..40 {
        if let Some(why) = refusal.get() {
            return HandoffError::StoppedReading {
                why: Some(why.clone()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    err
}
