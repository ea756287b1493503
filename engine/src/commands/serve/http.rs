//! The server's HTTP transport: hyper (HTTP/1.1) on a small tokio runtime. A request's
//! headers and then its body must each arrive within the request timeout (a stalled client
//! gets a 408 or is disconnected, and a kept-alive connection idle that long is closed), a
//! reply the client stops reading is cut off once no byte of it has gone out for that long,
//! open connections are capped, and bodies are capped. Answering is handed to the request threads
//! as whole requests: those threads never touch a socket, so a slow client holds none of them
//! (a streamed reply's events reach the connection through a channel).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_channel::Sender;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::protocol::ApiError;

/// A request read whole, for a request thread to answer.
pub struct Call {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub url: String,
    /// The whole body (at most [`Limits::max_body_bytes`]).
    pub body: String,
    /// Where the answer goes; closed once the client has gone.
    pub reply: oneshot::Sender<Answer>,
}

/// A reply: its status, then its body whole or as events while they come.
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    pub content_type: &'static str,
    pub body: ReplyBody,
}

impl Answer {
    /// A JSON body.
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self { status, content_type: "application/json", body: ReplyBody::Whole(Some(Bytes::from(value.to_string()))) }
    }

    /// The OpenAI error body of `err`, with its status.
    pub fn error(err: &ApiError) -> Self {
        Self::json(err.status, &err.body())
    }

    /// A server-sent event stream (status 200) whose text arrives through `events`; it ends
    /// when their sender is dropped.
    pub fn events(events: mpsc::UnboundedReceiver<Bytes>) -> Self {
        Self { status: 200, content_type: "text/event-stream", body: ReplyBody::Events(events) }
    }
}

/// A reply's body: whole (sent with its length), or events as the request thread sends them
/// (chunked).
pub enum ReplyBody {
    Whole(Option<Bytes>),
    Events(mpsc::UnboundedReceiver<Bytes>),
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ReplyBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ReplyBody::Events(events) => events.poll_recv(cx).map(|text| text.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ReplyBody::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplyBody::Whole(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ReplyBody::Whole(None) => SizeHint::with_exact(0),
            ReplyBody::Events(_) => SizeHint::default(),
        }
    }
}

/// What a client may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to send a request's headers, then its body; how long a kept-alive connection may
    /// sit idle; and how long a reply may wait on a client that reads none of it (the
    /// connection is then closed).
    pub request_timeout: Duration,
    /// The largest body taken (a longer one is a 413).
    pub max_body_bytes: usize,
    /// Connections open at once; more wait in the listen queue.
    pub max_connections: usize,
}

/// How long requests under way (a generation, its reply) get to finish once the server
/// stops; a connection still open after that is closed.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// A bound listening socket and the runtime that serves it.
pub struct Listener {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    port: u16,
}

/// Tells a serving [`Listener`] to stop (from any thread; held as long as it serves: the
/// connections stop once it is dropped).
pub struct StopHandle(watch::Sender<bool>);

impl StopHandle {
    /// Stops accepting connections; requests under way finish.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

impl Listener {
    /// Listens on `host:port` (port 0: a free one).
    pub fn bind(host: &str, port: u16) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("longrl-http").enable_all().build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((host, port)))
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        Ok(Self { runtime, listener, port })
    }

    /// The port listened on (the one picked, when asked for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop [`Listener::serve`], and what it watches.
    pub fn stop_handle() -> (StopHandle, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (StopHandle(tx), rx)
    }

    /// Accepts connections and hands their requests to `calls` until `stop` says so; then
    /// lets the requests under way finish (for up to [`STOP_GRACE`]) and returns, dropping
    /// `calls`, which ends the request threads once they have drained it.
    pub fn serve(self, calls: Sender<Call>, limits: Limits, stop: watch::Receiver<bool>) {
        let Self { runtime, listener, .. } = self;
        runtime.block_on(accept_until_stopped(listener, calls, limits, stop));
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

async fn accept_until_stopped(listener: tokio::net::TcpListener, calls: Sender<Call>, limits: Limits, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            _ = stop.changed() => break,
        };
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::debug!(error = %e, "a connection failed to open");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (calls, stop) = (calls.clone(), stop.clone());
        connections.spawn(async move {
            serve_connection(stream, calls, limits, stop).await;
            drop(slot);
        });
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = tokio::time::timeout(STOP_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    connections.abort_all();
}

/// One connection: its requests one after another, until the client closes it, a deadline
/// passes or the server stops (which lets a request under way finish).
async fn serve_connection(stream: tokio::net::TcpStream, calls: Sender<Call>, limits: Limits, mut stop: watch::Receiver<bool>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let calls = calls.clone();
        async move { Ok::<_, Infallible>(answer(request, &calls, limits).await) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.request_timeout);
    // A write that cannot go on for this long fails the connection: a client that never
    // reads its reply frees its connection slot.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(limits.request_timeout));
    let connection = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "a connection ended with an error");
            }
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// Reads a request whole, has a request thread answer it and returns the answer.
async fn answer(request: Request<Incoming>, calls: &Sender<Call>, limits: Limits) -> Response<ReplyBody> {
    let method = request.method().to_string();
    let url = request.uri().path().to_string();
    let answer = match read_body(request, limits).await {
        Ok(body) => {
            let (reply, answered) = oneshot::channel();
            match calls.send(Call { method, url, body, reply }) {
                Ok(()) => answered.await.unwrap_or_else(|_| Answer::error(&ApiError::status(503, "the server is shutting down"))),
                Err(_) => Answer::error(&ApiError::status(503, "the server is shutting down")),
            }
        }
        Err(err) => Answer::error(&err),
    };
    let streamed = matches!(answer.body, ReplyBody::Events(_));
    let mut response = Response::new(answer.body);
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(answer.content_type));
    if streamed {
        headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-cache"));
    }
    response
}

/// The body as text: at most `max_body_bytes`, arrived within the request timeout.
async fn read_body(request: Request<Incoming>, limits: Limits) -> Result<String, ApiError> {
    let body = Limited::new(request.into_body(), limits.max_body_bytes);
    let collected = match tokio::time::timeout(limits.request_timeout, body.collect()).await {
        Err(_) => {
            return Err(ApiError::status(
                408,
                format!("the request body did not arrive within {} s", limits.request_timeout.as_secs_f64()),
            ));
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::status(413, format!("the request body is larger than {} bytes", limits.max_body_bytes)));
        }
        Ok(Err(e)) => return Err(ApiError::status(400, format!("cannot read the request body: {e}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    String::from_utf8(collected.to_vec()).map_err(|e| ApiError::status(400, format!("the request body is not UTF-8: {e}")))
}
