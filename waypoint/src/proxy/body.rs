//! Bodies: the one boxed type requests and responses are carried in, and a wrapper that
//! counts what passes and says when the body ended (for metrics, the access log and handing
//! an upstream HTTP/1.1 connection back to the pool).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// Called once when a tracked body ends: `true` when it was read to its end, `false` when it
/// was dropped early or failed.
pub type OnEnd = Box<dyn FnOnce(bool) + Send>;

/// Counts the data bytes of `inner` into `count` and calls `on_end` once.
pub struct Tracked<B> {
    inner: B,
    count: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
    /// Nothing to read: a body that is empty from the start (204, 304, HEAD,
    /// `content-length: 0`) may never be polled, so dropping it is its complete end.
    empty: bool,
}

impl<B: HttpBody> Tracked<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>, on_end: Option<OnEnd>) -> Self {
        let empty = inner.is_end_stream();
        Tracked {
            inner,
            count,
            on_end,
            empty,
        }
    }
}

impl<B> Tracked<B> {
    fn end(&mut self, complete: bool) {
        if let Some(f) = self.on_end.take() {
            f(complete);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        let complete = self.empty;
        self.end(complete);
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.end(true);
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[tokio::test]
    async fn counts_and_reports_the_end_once() {
        let count = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicBool::new(false));
        let e = ended.clone();
        let b = Tracked::new(
            Full::new(Bytes::from_static(b"hello")),
            count.clone(),
            Some(Box::new(move |complete| {
                assert!(complete);
                assert!(!e.swap(true, Ordering::SeqCst), "called twice");
            })),
        );
        let got = b.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        assert_eq!(count.load(Ordering::SeqCst), 5);
        assert!(ended.load(Ordering::SeqCst));
        // Dropped unread: reported incomplete.
        let (tx, rx) = std::sync::mpsc::channel();
        drop(Tracked::new(
            Full::new(Bytes::from_static(b"x")),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |c| tx.send(c).unwrap())),
        ));
        assert!(!rx.recv().unwrap());
        // Empty from the start and never polled: complete.
        let (tx, rx) = std::sync::mpsc::channel();
        drop(Tracked::new(
            Empty::<Bytes>::new(),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |c| tx.send(c).unwrap())),
        ));
        assert!(rx.recv().unwrap());
    }
}
