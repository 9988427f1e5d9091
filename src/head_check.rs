//! Every request head is checked here before hyper reads it, on both
//! listeners, so that a malformed one gets the JSON error of every other
//! refusal and not hyper's bare `400`/`414`/`431` (hyper offers no hook for
//! the answers its parser gives itself).
//!
//! [`HeadCheck`] sits between the socket and hyper. It follows the
//! connection's framing as hyper does (a head, then a `Content-Length` or
//! chunked body, then the next head) and parses each head with `httparse`,
//! hyper's own parser with hyper's settings, plus the checks hyper adds
//! (method, request target, `Content-Length`, `Transfer-Encoding`), and
//! some of tollgate's own: a head of at most [`MAX_HEAD_BYTES`], a target of
//! at most [`MAX_TARGET_BYTES`], at most [`MAX_HEADERS`] fields (hyper's
//! are ~400 KiB, 64 KiB and the same 100), one `Content-Length` at most
//! (even two equal ones are refused), `Transfer-Encoding: chunked` alone
//! and never with a `Content-Length` (a request with both framings is
//! refused, as HAProxy does, instead of being forwarded with one of them).
//! Whatever hyper refuses is refused here first.
//!
//! A head that passes goes to hyper as it arrived: the bytes are read into
//! hyper's own buffer and only looked at (no copy) unless a head arrives
//! over several reads; then its start is held here until it is complete
//! (hyper parses a head only once it is whole anyway). A refused head never
//! reaches hyper: in its place hyper gets a stand-in request
//! (`TOLLGATE-REFUSED /<n>` with `Connection: close`), which the listener's
//! service answers with the refusal's JSON error ([`refusal_of`]), after
//! any earlier pipelined request's answer, and then hyper closes the
//! connection. The rest of what the client sends is read and dropped for a
//! while before the socket closes, so the client reads the answer instead
//! of a reset. A client that sends such a stand-in itself gets the same
//! answer: it is refused as malformed.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest request head (request line and header fields) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest request target (path and query) accepted.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// The most header fields a request may have (hyper's own limit).
pub const MAX_HEADERS: usize = 100;

/// The method of the stand-in request that carries a refusal to the service.
const STAND_IN_METHOD: &str = "TOLLGATE-REFUSED";

/// After a refusal's answer: how long, and how much, the client's further
/// bytes are read and dropped before the socket closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request line or a header field cannot be read.
    Malformed,
    /// The request target is not a valid URI.
    InvalidTarget,
    /// A `Content-Length` that is not a number.
    ContentLength,
    /// More than one `Content-Length` field (even with equal values).
    ContentLengthRepeated,
    /// A `Transfer-Encoding` other than one `chunked`, or one on HTTP/1.0.
    TransferEncoding,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthWithEncoding,
    /// A request target over [`MAX_TARGET_BYTES`].
    TargetTooLong,
    /// A request head over [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    TooManyHeaders,
}

const ALL: [Refusal; 9] = [
    Refusal::Malformed,
    Refusal::InvalidTarget,
    Refusal::ContentLength,
    Refusal::ContentLengthRepeated,
    Refusal::TransferEncoding,
    Refusal::LengthWithEncoding,
    Refusal::TargetTooLong,
    Refusal::HeadTooLarge,
    Refusal::TooManyHeaders,
];

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::TargetTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadTooLarge | Self::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::TargetTooLong => "InvalidParameter.UriTooLong",
            Self::HeadTooLarge | Self::TooManyHeaders => "InvalidParameter.HeaderTooLarge",
            _ => "InvalidParameter.MalformedRequest",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Malformed => "the request line or a header field is malformed",
            Self::InvalidTarget => "the request target is not a valid URI",
            Self::ContentLength => "Content-Length is not a number",
            Self::ContentLengthRepeated => "Content-Length is sent more than once",
            Self::TransferEncoding => {
                "Transfer-Encoding must be `chunked` alone (and is not allowed on HTTP/1.0)"
            }
            Self::LengthWithEncoding => {
                "Content-Length and Transfer-Encoding must not be sent together"
            }
            Self::TargetTooLong => "the request target is longer than 8192 bytes",
            Self::HeadTooLarge => "the request head is larger than 65536 bytes",
            Self::TooManyHeaders => "the request has more than 100 header fields",
        }
    }

    fn index(self) -> usize {
        ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    fn stand_in(self) -> Vec<u8> {
        format!(
            "{STAND_IN_METHOD} /{} HTTP/1.1\r\nconnection: close\r\n\r\n",
            self.index()
        )
        .into_bytes()
    }
}

/// The refusal a stand-in request carries; `None` for every other request.
pub fn refusal_of<B>(req: &http::Request<B>) -> Option<Refusal> {
    if req.method().as_str() != STAND_IN_METHOD {
        return None;
    }
    let i: usize = req.uri().path().strip_prefix('/')?.parse().ok()?;
    ALL.get(i).copied()
}

/// Where the connection is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// The next byte starts a request head.
    Head,
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunked),
    /// A chunked body this check cannot follow: hyper fails it and ends
    /// the connection, so nothing after it is checked.
    Off,
}

/// What [`Scanner::scan`] says of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// All of them may go to hyper.
    Pass,
    /// Those before this offset may go; from it on, a head not complete yet.
    Hold(usize),
    /// Those before this offset may go; a refused head starts there.
    Refuse(usize, Refusal),
}

#[derive(Debug)]
struct Scanner {
    framing: Framing,
}

impl Scanner {
    fn new() -> Self {
        Self {
            framing: Framing::Head,
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> Scan {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.framing {
                Framing::Off => return Scan::Pass,
                Framing::Length(left) => {
                    let n = (bytes.len() - i).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    i += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.framing = Framing::Head;
                    }
                }
                Framing::Chunked(c) => {
                    let (n, end) = c.advance(&bytes[i..]);
                    i += n;
                    match end {
                        BodyEnd::More => {}
                        BodyEnd::Done => self.framing = Framing::Head,
                        BodyEnd::Lost => self.framing = Framing::Off,
                    }
                }
                Framing::Head => match parse_head(&bytes[i..]) {
                    Head::Complete(len, next) => {
                        i += len;
                        self.framing = next;
                    }
                    Head::Partial => return Scan::Hold(i),
                    Head::Refused(r) => return Scan::Refuse(i, r),
                },
            }
        }
        Scan::Pass
    }
}

enum Head {
    Complete(usize, Framing),
    Partial,
    Refused(Refusal),
}

fn parse_head(bytes: &[u8]) -> Head {
    let mut headers: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    // hyper's parser with hyper's (default) settings.
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        bytes,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            // The request line alone is already too long, or the head.
            let line_too_long = match req.path {
                Some(path) => path.len() > MAX_TARGET_BYTES,
                None => bytes.len() > MAX_TARGET_BYTES + 64,
            };
            return if line_too_long {
                Head::Refused(Refusal::TargetTooLong)
            } else if bytes.len() > MAX_HEAD_BYTES {
                Head::Refused(Refusal::HeadTooLarge)
            } else {
                Head::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Head::Refused(Refusal::TooManyHeaders),
        Err(_) => return Head::Refused(Refusal::Malformed),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Head::Refused(Refusal::Malformed);
    };
    if target.len() > MAX_TARGET_BYTES {
        return Head::Refused(Refusal::TargetTooLong);
    }
    if len > MAX_HEAD_BYTES {
        return Head::Refused(Refusal::HeadTooLarge);
    }
    if method == STAND_IN_METHOD || http::Method::from_bytes(method.as_bytes()).is_err() {
        return Head::Refused(Refusal::Malformed);
    }
    if !target_is_valid(target.as_bytes()) {
        return Head::Refused(Refusal::InvalidTarget);
    }
    let mut length = None;
    let mut lengths = 0u32;
    let mut encodings = 0u32;
    let mut chunked = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            // As hyper reads it: digits only, no sign, no list.
            match from_digits(h.value) {
                Some(n) => length = Some(n),
                None => return Head::Refused(Refusal::ContentLength),
            }
        } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
            encodings += 1;
            chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
        }
    }
    if lengths > 0 && encodings > 0 {
        return Head::Refused(Refusal::LengthWithEncoding);
    }
    if lengths > 1 {
        return Head::Refused(Refusal::ContentLengthRepeated);
    }
    if encodings > 1 || (encodings == 1 && (!chunked || version == 0)) {
        return Head::Refused(Refusal::TransferEncoding);
    }
    let next = match (encodings, length) {
        (1, _) => Framing::Chunked(Chunked::new()),
        // hyper's largest length.
        (_, Some(n)) if n > u64::MAX - 2 => return Head::Refused(Refusal::ContentLength),
        (_, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Head,
    };
    Head::Complete(len, next)
}

/// Whether hyper takes `target` as a request target (it parses it as an
/// `http::Uri`). An origin-form target of common characters is known to
/// be valid without that parse, which copies.
fn target_is_valid(target: &[u8]) -> bool {
    (target.first() == Some(&b'/') && target.iter().all(|&b| PLAIN_TARGET[b as usize]))
        || http::Uri::try_from(target).is_ok()
}

/// Bytes `http::Uri` accepts anywhere in an origin-form path and query.
const PLAIN_TARGET: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'/'
                    | b'?'
                    | b'='
                    | b'&'
                    | b'%'
                    | b'+'
                    | b','
                    | b';'
                    | b':'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
            );
        i += 1;
    }
    t
};

/// hyper's reading of a `Content-Length` value.
fn from_digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// A chunked body followed byte by byte as hyper's decoder reads it, data
/// skipped by length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunked {
    state: Chunk,
    size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, PartialEq, Eq)]
enum BodyEnd {
    /// The body goes on past these bytes.
    More,
    /// The body ended within them.
    Done,
    /// Bytes hyper's decoder refuses.
    Lost,
}

impl Chunked {
    fn new() -> Self {
        Self {
            state: Chunk::Start,
            size: 0,
        }
    }

    /// Follows the body through `bytes`: how many of them it took, and
    /// whether it ended there.
    fn advance(&mut self, bytes: &[u8]) -> (usize, BodyEnd) {
        use Chunk::*;
        let mut i = 0;
        while i < bytes.len() {
            if self.state == Data {
                let n = (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                i += n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match (self.state, b) {
                (Start | Size, b) if hex(b).is_some() => {
                    let Some(size) = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(hex(b).unwrap_or(0)))
                    else {
                        return (i, BodyEnd::Lost);
                    };
                    self.size = size;
                    Size
                }
                (Size | SizeLws, b' ' | b'\t') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return (i, BodyEnd::Lost),
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Start,
                (EndCr, b'\r') => EndLf,
                (EndCr | Trailer, _) if b != b'\r' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => EndCr,
                (EndLf, b'\n') => return (i, BodyEnd::Done),
                _ => return (i, BodyEnd::Lost),
            };
        }
        (i, BodyEnd::More)
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// A connection's I/O with every request head checked before hyper reads
/// it (see the module's documentation).
pub struct HeadCheck<T> {
    inner: T,
    scanner: Scanner,
    /// Bytes read and not yet given to hyper: `held[given..vetted]` may go,
    /// `held[vetted..]` is the start of a head not complete yet.
    held: Vec<u8>,
    given: usize,
    vetted: usize,
    /// After a refusal: the stand-in request and how much of it hyper has.
    stand_in: Option<(Vec<u8>, usize)>,
    linger: Option<Linger>,
}

struct Linger {
    deadline: Pin<Box<tokio::time::Sleep>>,
    drained: usize,
    shut: bool,
}

impl<T> HeadCheck<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            scanner: Scanner::new(),
            held: Vec::new(),
            given: 0,
            vetted: 0,
            stand_in: None,
            linger: None,
        }
    }

    fn refuse(&mut self, refusal: Refusal) {
        tracing::debug!(
            code = refusal.code(),
            why = refusal.message(),
            "request head refused"
        );
        self.stand_in = Some((refusal.stand_in(), 0));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadCheck<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.given < this.vetted {
                let n = (this.vetted - this.given).min(buf.remaining());
                buf.put_slice(&this.held[this.given..this.given + n]);
                this.given += n;
                return Poll::Ready(Ok(()));
            }
            if this.vetted > 0 {
                this.held.drain(..this.vetted);
                this.given = 0;
                this.vetted = 0;
                if this.held.is_empty() {
                    // No buffer kept per idle connection.
                    this.held = Vec::new();
                }
            }
            if let Some((bytes, given)) = &mut this.stand_in {
                if *given < bytes.len() {
                    let n = (bytes.len() - *given).min(buf.remaining());
                    buf.put_slice(&bytes[*given..*given + n]);
                    *given += n;
                    return Poll::Ready(Ok(()));
                }
                // hyper has the whole stand-in: it answers it and closes.
                return Poll::Pending;
            }
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                // The end of the stream; a head not complete is dropped
                // (hyper would close without an answer too).
                this.held = Vec::new();
                return Poll::Ready(Ok(()));
            }
            if this.held.is_empty() {
                // The common case: the bytes stay where hyper reads them.
                match this.scanner.scan(&buf.filled()[before..]) {
                    Scan::Pass => return Poll::Ready(Ok(())),
                    Scan::Hold(n) => {
                        this.held.extend_from_slice(&buf.filled()[before + n..]);
                        buf.set_filled(before + n);
                    }
                    Scan::Refuse(n, refusal) => {
                        buf.set_filled(before + n);
                        this.refuse(refusal);
                    }
                }
                if buf.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
            } else {
                // A head arriving over several reads: it is held here until
                // complete, and checked from its start.
                this.held.extend_from_slice(&buf.filled()[before..]);
                buf.set_filled(before);
                match this.scanner.scan(&this.held) {
                    Scan::Pass => this.vetted = this.held.len(),
                    Scan::Hold(n) => this.vetted = n,
                    Scan::Refuse(n, refusal) => {
                        this.held.truncate(n);
                        this.vetted = n;
                        this.refuse(refusal);
                    }
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeadCheck<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stand_in.is_none() {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        // After a refusal: the answer is out; end the write side, then read
        // and drop what the client still sends (the rest of a head too
        // large, say) for a while, so that closing with unread bytes does
        // not reset the connection before the client has read the answer.
        let linger = this.linger.get_or_insert_with(|| Linger {
            deadline: Box::pin(tokio::time::sleep(LINGER)),
            drained: 0,
            shut: false,
        });
        if !linger.shut {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            linger.shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if linger.deadline.as_mut().poll(cx).is_ready() || linger.drained >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb)) {
                Ok(()) if !rb.filled().is_empty() => linger.drained += rb.filled().len(),
                // The client closed too, or the socket failed: done.
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Scan {
        Scanner::new().scan(bytes)
    }

    #[test]
    fn heads_and_their_bodies() {
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(scan(get), Scan::Pass);
        // A pipelined pair, a Content-Length body between them.
        let mut two = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        two.extend_from_slice(get);
        assert_eq!(scan(&two), Scan::Pass);
        // A chunked body with an extension and a trailer, then a bad head.
        let mut chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked.extend_from_slice(b"5;x=y\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n");
        let at = chunked.len();
        chunked.extend_from_slice(
            b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(
            scan(&chunked),
            Scan::Refuse(at, Refusal::ContentLengthRepeated)
        );
        // Body bytes that look like a head are a body.
        let body = b"POST /a HTTP/1.1\r\nContent-Length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(scan(body), Scan::Pass);
        // A head not complete yet is held from its start.
        let mut partial = get.to_vec();
        partial.extend_from_slice(b"POST /b HTTP/1.1\r\nContent-Le");
        assert_eq!(scan(&partial), Scan::Hold(get.len()));
        // Empty lines before a head are part of it (hyper skips them too).
        assert_eq!(scan(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Scan::Pass);
    }

    #[test]
    fn a_body_split_anywhere_is_followed() {
        let mut stream = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        stream.extend_from_slice(b"3\r\nabc\r\n10 ;e\r\n0123456789abcdef\r\n0\r\n\r\n");
        stream.extend_from_slice(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz");
        let bad_at = stream.len();
        stream.extend_from_slice(b"GET /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        for split in 1..stream.len() {
            let mut s = Scanner::new();
            let (a, b) = stream.split_at(split);
            // As the wrapper does: what is held is checked again with more.
            let verdict = match s.scan(a) {
                Scan::Pass => s.scan(b).shift(split),
                Scan::Hold(n) => s.scan(&stream[n..]).shift(n),
                other => other,
            };
            assert_eq!(
                verdict,
                Scan::Refuse(bad_at, Refusal::TransferEncoding),
                "split at {split}"
            );
        }
    }

    impl Scan {
        fn shift(self, by: usize) -> Scan {
            match self {
                Scan::Pass => Scan::Pass,
                Scan::Hold(n) => Scan::Hold(n + by),
                Scan::Refuse(n, r) => Scan::Refuse(n + by, r),
            }
        }
    }

    #[test]
    fn what_is_refused() {
        use Refusal::*;
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET_BYTES));
        // Still arriving: no space after the target yet.
        let arriving_target = format!("GET /{}", "a".repeat(MAX_TARGET_BYTES + 100));
        let big_head = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases: &[(&[u8], Refusal)] = &[
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", ContentLengthRepeated),
            (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", ContentLengthRepeated),
            (b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n", ContentLength),
            (b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", ContentLength),
            (b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", ContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", LengthWithEncoding),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", LengthWithEncoding),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", TransferEncoding),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", TransferEncoding),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", TransferEncoding),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", TransferEncoding),
            (b"GET / HTTP/9.9\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n", Malformed),
            (b"G(T / HTTP/1.1\r\n\r\n", Malformed),
            (b"TOLLGATE-REFUSED /0 HTTP/1.1\r\n\r\n", Malformed),
            (b"GET /a<b HTTP/1.1\r\n\r\n", InvalidTarget),
            (b"GET http://[::1 HTTP/1.1\r\n\r\n", InvalidTarget),
            (long_target.as_bytes(), TargetTooLong),
            (arriving_target.as_bytes(), TargetTooLong),
            (big_head.as_bytes(), HeadTooLarge),
            (&big_head.as_bytes()[..MAX_HEAD_BYTES + 10], HeadTooLarge),
            (many.as_bytes(), TooManyHeaders),
        ];
        for (head, refusal) in cases {
            assert_eq!(
                scan(head),
                Scan::Refuse(0, *refusal),
                "{:?}",
                String::from_utf8_lossy(&head[..head.len().min(80)])
            );
        }
        // Accepted: one length, chunked alone in any case, targets in
        // every form hyper takes.
        for ok in [
            &b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            b"GET http://example.com/x?y HTTP/1.1\r\n\r\n",
            b"GET /a%20b/{\"c\"}?d=e|f HTTP/1.0\r\n\r\n",
        ] {
            assert!(
                !matches!(scan(ok), Scan::Refuse(..)),
                "{:?}",
                String::from_utf8_lossy(ok)
            );
        }
    }

    #[test]
    fn plain_targets_are_valid_uris() {
        for b in 0..=255u8 {
            if PLAIN_TARGET[b as usize] {
                let t = format!("/a{}b?c{}d", b as char, b as char);
                assert!(http::Uri::try_from(t.as_bytes()).is_ok(), "{t:?}");
            }
        }
    }

    #[test]
    fn stand_ins_carry_their_refusal() {
        for r in ALL {
            let bytes = r.stand_in();
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut req = httparse::Request::new(&mut headers);
            assert!(req.parse(&bytes).unwrap().is_complete());
            let req = http::Request::builder()
                .method(req.method.unwrap())
                .uri(req.path.unwrap())
                .body(())
                .unwrap();
            assert_eq!(refusal_of(&req), Some(r));
        }
        let plain = http::Request::post("/0").body(()).unwrap();
        assert_eq!(refusal_of(&plain), None);
    }

    /// The wrapper over an in-memory stream: what hyper would read.
    #[tokio::test]
    async fn hyper_reads_checked_heads_and_stand_ins() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut check = HeadCheck::new(server);
        let good = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let writer = tokio::spawn(async move {
            // Split in small writes: heads arrive over several reads.
            for chunk in good.chunks(7) {
                client.write_all(chunk).await.unwrap();
            }
            client
                .write_all(
                    b"POST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                )
                .await
                .unwrap();
            client
        });
        let mut seen = Vec::new();
        let mut buf = [0u8; 16];
        let expected = {
            let mut e = good.to_vec();
            e.extend_from_slice(&Refusal::LengthWithEncoding.stand_in());
            e
        };
        while seen.len() < expected.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), check.read(&mut buf))
                .await
                .expect("bytes in time")
                .unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&seen),
            String::from_utf8_lossy(&expected)
        );
        // Nothing more: hyper answers the stand-in and closes.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), check.read(&mut buf))
                .await
                .is_err()
        );
        drop(writer.await.unwrap());
    }
}
