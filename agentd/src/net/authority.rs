//! Accepts any HTTP/2 `:authority` on the Unix sockets we serve.
//!
//! Why this exists: over a Unix socket, gRPC clients disagree on what `:authority` is.
//! grpc-go and Node's grpc-js send `localhost`; grpc C-core (Python `grpcio`, Ruby, PHP, C++)
//! since 1.57 sends the percent-encoded socket path (`%2Ftmp%2Fagent.sock`); grpc-java and
//! grpc-swift send the raw path. hyper's `h2` insists on a valid URI authority (RFC 3986
//! §3.2.2) and answers anything else with RST_STREAM(PROTOCOL_ERROR), so py-spiffe could not
//! talk to a tonic server at all. On a Unix socket the authority names nothing we route on,
//! so every value is acceptable there (SPIRE accepts them all too).
//!
//! What it does: [`AuthorityRewrite`] wraps an accepted connection and rewrites the bytes the
//! *client* sends, before the HTTP/2 server reads them:
//! - the client preface (RFC 9113 §3.4) must be there, else the connection ends;
//! - every frame but HEADERS/CONTINUATION passes through byte for byte, and is never
//!   buffered whole (DATA frames are read straight into the server's buffer);
//! - each header block (HEADERS + CONTINUATION, RFC 9113 §4.3) is decoded with HPACK (RFC 7541)
//!   against the client's dynamic table, `:authority` is replaced by `localhost`, and the block
//!   is re-encoded as literals without indexing (RFC 7541 §6.2.2), so the server's decoder table
//!   is never used and cannot drift from the client's. END_STREAM and the priority fields
//!   survive; padding does not (it is optional).
//!
//! Only when needed: the first header block of a connection decides. When every
//! `:authority` in it is one the server accepts (or there is none), that block and everything
//! after it pass through untouched, with no decoding at all: the server's HPACK table then
//! follows the client's as usual. grpc-go, grpc-js and tonic clients send one authority for
//! every call of a channel, so they never pay for the rewrite (it was a fifth of the node
//! agent's CPU per call). A client that sent an acceptable authority first and an unacceptable
//! one later gets the server's RST_STREAM for that call, as it would without this module.
//!
//! Nothing else changes: every other header (`workload.spiffe.io` included) reaches the
//! handlers as the client sent it, the peer credentials are read from the socket before it is
//! wrapped, and the server's own frame and header-list limits still apply after ours. The
//! server → client direction is not touched. Bad framing (no preface, an oversized frame, a
//! header block that does not decode or is too large, a frame inside an open header block) is
//! a connection error: the read fails, the server drops the connection, nothing panics and
//! nothing is buffered past the limits below.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE of our HTTP/2 servers: the RFC 9113 §6.5.2 initial value, which
/// tonic does not raise. A client may not send a bigger frame, so a HEADERS or CONTINUATION
/// frame above it is refused rather than buffered.
pub const MAX_FRAME_SIZE: usize = 16_384;
/// The most header-block bytes (all fragments of one block) buffered before decoding.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The most decoded header-list size (RFC 9113 §6.5.2 accounting: name + value + 32 per
/// field). An HPACK block can reference its dynamic table many times over, so the decoded list
/// is bounded separately from the encoded block.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE: the initial 4,096 (RFC 7541 §4.2); our servers do not change
/// it, so a client's dynamic table never exceeds it.
const HEADER_TABLE_SIZE: usize = 4096;
/// How much is read from the socket at a time while a frame header or header block is
/// incomplete.
const READ_CHUNK: usize = 8 * 1024;
/// What `:authority` becomes.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

// Frame types and flags (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's HTTP/2 framing was refused on a Unix socket.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The connection did not start with the HTTP/2 client preface (RFC 9113 §3.4).
    #[error("not an HTTP/2 connection: the client preface is missing")]
    BadPreface,
    /// A HEADERS or CONTINUATION frame longer than SETTINGS_MAX_FRAME_SIZE (RFC 9113 §4.2).
    #[error(
        "{kind} frame on stream {stream} is {len} bytes, more than the maximum frame size {max}"
    )]
    FrameTooLarge {
        kind: &'static str,
        stream: u32,
        len: usize,
        max: usize,
    },
    /// The fragments of one header block add up to more than [`MAX_HEADER_BLOCK`].
    #[error("header block on stream {stream} is larger than {max} bytes")]
    HeaderBlockTooLarge { stream: u32, max: usize },
    /// The decoded header list is larger than [`MAX_HEADER_LIST`].
    #[error("header list on stream {stream} is larger than {max} bytes")]
    HeaderListTooLarge { stream: u32, max: usize },
    /// The pad length or priority fields do not fit in the HEADERS frame (RFC 9113 §6.2).
    #[error("HEADERS frame on stream {stream}: {reason}")]
    MalformedHeaders { stream: u32, reason: &'static str },
    /// A frame other than CONTINUATION for the same stream arrived inside an open header block
    /// (RFC 9113 §6.10).
    #[error("expected CONTINUATION for stream {stream}, got frame type {got:#04x} on stream {got_stream}")]
    ExpectedContinuation {
        stream: u32,
        got: u8,
        got_stream: u32,
    },
    /// CONTINUATION with no header block open (RFC 9113 §6.10).
    #[error("CONTINUATION frame on stream {stream} without an open header block")]
    UnexpectedContinuation { stream: u32 },
    /// Clients never send PUSH_PROMISE (RFC 9113 §8.4).
    #[error("the client sent PUSH_PROMISE on stream {stream}")]
    PushPromiseFromClient { stream: u32 },
    /// The header block is not valid HPACK (RFC 7541 §2.3, §5, §6).
    #[error("header block on stream {stream} does not decode: {source}")]
    Hpack {
        stream: u32,
        #[source]
        source: loona_hpack::decoder::DecoderError,
    },
}

impl From<FramingError> for io::Error {
    fn from(e: FramingError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

#[derive(Debug)]
enum ReadState {
    /// Matching the client preface; `matched` bytes of it seen.
    Preface { matched: usize },
    /// Waiting for the next 9-byte frame header.
    FrameHeader,
    /// Copying the rest of a frame that is not ours to look at.
    Passthrough { remaining: usize },
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderPayload(FrameHeader),
    /// The first header block needed no rewrite: everything after it is the server's to read
    /// as it is.
    Transparent,
    /// A framing error ended the connection.
    Failed(FramingError),
}

/// A header block being collected (HEADERS, then CONTINUATION until END_HEADERS).
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// A server-side connection on a Unix socket whose client header blocks have `:authority`
/// replaced by `localhost` (see the module docs for why and how).
pub struct AuthorityRewrite<S> {
    inner: S,
    state: ReadState,
    open: Option<OpenBlock>,
    /// Read from the socket, not yet processed.
    input: BytesMut,
    /// Processed, not yet handed to the server.
    output: BytesMut,
    decoder: loona_hpack::Decoder<'static>,
    /// Set once the first header block was decoded: whether it (and so the connection)
    /// needed the rewrite.
    rewriting: Option<bool>,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityRewrite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewrite")
            .field("state", &self.state)
            .field("buffered", &(self.input.len() + self.output.len()))
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityRewrite<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            inner,
            state: ReadState::Preface { matched: 0 },
            open: None,
            input: BytesMut::new(),
            output: BytesMut::new(),
            decoder,
            rewriting: None,
            eof: false,
        }
    }

    /// The wrapped connection (for its peer credentials, say).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Processes what has been read so far. Returns whether anything changed; when nothing
    /// did, more input is needed.
    fn process(&mut self) -> Result<bool, FramingError> {
        match self.state {
            ReadState::Failed(ref e) => Err(e.clone()),
            ReadState::Transparent => {
                if self.input.is_empty() {
                    return Ok(false);
                }
                let rest = self.input.split();
                self.output.put(rest);
                Ok(true)
            }
            ReadState::Preface { matched } => {
                let n = (PREFACE.len() - matched).min(self.input.len());
                if self.input[..n] != PREFACE[matched..matched + n] {
                    return Err(FramingError::BadPreface);
                }
                self.output.put(self.input.split_to(n));
                self.state = if matched + n == PREFACE.len() {
                    ReadState::FrameHeader
                } else {
                    ReadState::Preface {
                        matched: matched + n,
                    }
                };
                Ok(n > 0)
            }
            ReadState::FrameHeader => {
                if self.input.len() < FRAME_HEADER_LEN {
                    return Ok(false);
                }
                let header = FrameHeader::parse(&self.input[..FRAME_HEADER_LEN]);
                if let Some(open) = &self.open {
                    if header.kind != CONTINUATION || header.stream != open.stream {
                        return Err(FramingError::ExpectedContinuation {
                            stream: open.stream,
                            got: header.kind,
                            got_stream: header.stream,
                        });
                    }
                }
                match header.kind {
                    HEADERS | CONTINUATION => {
                        if header.kind == CONTINUATION && self.open.is_none() {
                            return Err(FramingError::UnexpectedContinuation {
                                stream: header.stream,
                            });
                        }
                        if header.len > MAX_FRAME_SIZE {
                            return Err(FramingError::FrameTooLarge {
                                kind: if header.kind == HEADERS {
                                    "HEADERS"
                                } else {
                                    "CONTINUATION"
                                },
                                stream: header.stream,
                                len: header.len,
                                max: MAX_FRAME_SIZE,
                            });
                        }
                        self.input.advance(FRAME_HEADER_LEN);
                        self.state = ReadState::HeaderPayload(header);
                    }
                    PUSH_PROMISE => {
                        return Err(FramingError::PushPromiseFromClient {
                            stream: header.stream,
                        })
                    }
                    _ => {
                        self.output.put(self.input.split_to(FRAME_HEADER_LEN));
                        self.state = ReadState::Passthrough {
                            remaining: header.len,
                        };
                    }
                }
                Ok(true)
            }
            ReadState::Passthrough { remaining } => {
                if remaining == 0 {
                    self.state = ReadState::FrameHeader;
                    return Ok(true);
                }
                let n = remaining.min(self.input.len());
                if n == 0 {
                    return Ok(false);
                }
                self.output.put(self.input.split_to(n));
                self.state = ReadState::Passthrough {
                    remaining: remaining - n,
                };
                Ok(true)
            }
            ReadState::HeaderPayload(header) => {
                if self.input.len() < header.len {
                    return Ok(false);
                }
                let payload = self.input.split_to(header.len);
                self.header_frame(header, &payload)?;
                self.state = if self.rewriting == Some(false) {
                    ReadState::Transparent
                } else {
                    ReadState::FrameHeader
                };
                Ok(true)
            }
        }
    }

    /// One HEADERS or CONTINUATION frame's payload (RFC 9113 §6.2, §6.10).
    fn header_frame(&mut self, header: FrameHeader, payload: &[u8]) -> Result<(), FramingError> {
        let stream = header.stream;
        if header.kind == HEADERS {
            let malformed = |reason| FramingError::MalformedHeaders { stream, reason };
            let mut rest = payload;
            let mut pad = 0;
            if header.flags & PADDED != 0 {
                let (&len, tail) = rest.split_first().ok_or(malformed("no pad length"))?;
                pad = usize::from(len);
                rest = tail;
            }
            let mut priority = None;
            if header.flags & PRIORITY != 0 {
                if rest.len() < 5 {
                    return Err(malformed("too short for its priority fields"));
                }
                let (fields, tail) = rest.split_at(5);
                priority = Some([fields[0], fields[1], fields[2], fields[3], fields[4]]);
                rest = tail;
            }
            if pad > rest.len() {
                return Err(malformed("padding longer than the frame"));
            }
            self.open = Some(OpenBlock {
                stream,
                end_stream: header.flags & END_STREAM != 0,
                priority,
                fragment: rest[..rest.len() - pad].to_vec(),
            });
        } else if let Some(open) = &mut self.open {
            open.fragment.extend_from_slice(payload);
        }
        let too_large = self
            .open
            .as_ref()
            .is_some_and(|o| o.fragment.len() > MAX_HEADER_BLOCK);
        if too_large {
            return Err(FramingError::HeaderBlockTooLarge {
                stream,
                max: MAX_HEADER_BLOCK,
            });
        }
        if header.flags & END_HEADERS != 0 {
            if let Some(block) = self.open.take() {
                self.rewrite_block(block)?;
            }
        }
        Ok(())
    }

    /// Decodes a complete header block, replaces `:authority`, and writes it out again as
    /// HEADERS (+ CONTINUATION when it no longer fits one frame). The first block of the
    /// connection is written out as the client encoded it instead when its `:authority` is
    /// acceptable, and the connection goes transparent (see the module docs).
    fn rewrite_block(&mut self, block: OpenBlock) -> Result<(), FramingError> {
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut list_size = 0usize;
        let mut acceptable = true;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size > MAX_HEADER_LIST {
                    return;
                }
                let value: &[u8] = if &name[..] == b":authority" {
                    // What the server checks before it answers RST_STREAM(PROTOCOL_ERROR).
                    acceptable &=
                        tonic::codegen::http::uri::Authority::try_from(&value[..]).is_ok();
                    LOCAL_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&mut encoded, &name, value);
            })
            .map_err(|source| FramingError::Hpack { stream, source })?;
        if list_size > MAX_HEADER_LIST {
            return Err(FramingError::HeaderListTooLarge {
                stream,
                max: MAX_HEADER_LIST,
            });
        }
        let rewriting = *self.rewriting.get_or_insert(!acceptable);
        let out = if rewriting {
            &encoded
        } else {
            // The client's own encoding: the server's decoder table must see every entry
            // the client's encoder added, from this block on.
            &block.fragment
        };
        write_header_frames(
            &mut self.output,
            stream,
            block.end_stream,
            block.priority,
            out,
        );
        Ok(())
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1); `flags` fills the bits above it.
fn encode_integer(out: &mut Vec<u8>, value: usize, prefix_bits: u8, flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A "literal header field without indexing — new name" (RFC 7541 §6.2.2), both strings as
/// raw octets (H = 0, §5.2).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_integer(out, name.len(), 7, 0);
    out.extend_from_slice(name);
    encode_integer(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

fn write_header_frames(
    out: &mut BytesMut,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let priority_len = if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(MAX_FRAME_SIZE - priority_len));
    let mut flags = 0;
    if end_stream {
        flags |= END_STREAM;
    }
    if priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    put_frame_header(out, first.len() + priority_len, HEADERS, flags, stream);
    if let Some(p) = priority {
        out.put_slice(&p);
    }
    out.put_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), CONTINUATION, flags, stream);
        out.put_slice(chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            // Once transparent, the client's bytes go straight into the server's buffer, and
            // ours are given back: a connection may stay open for days.
            if matches!(this.state, ReadState::Transparent) && this.input.is_empty() {
                if this.input.capacity() > 0 || this.output.capacity() > 0 {
                    this.input = BytesMut::new();
                    this.output = BytesMut::new();
                    // The client's dynamic table is the server's to follow from now on.
                    this.decoder = loona_hpack::Decoder::new();
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // The body of a frame we pass through goes straight into the server's buffer.
            if let ReadState::Passthrough { remaining } = this.state {
                if remaining > 0 && this.input.is_empty() && !this.eof {
                    let limit = remaining.min(buf.remaining());
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                    let n = direct.filled().len();
                    buf.advance(n);
                    if n == 0 {
                        this.eof = true;
                    } else {
                        this.state = ReadState::Passthrough {
                            remaining: remaining - n,
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            match this.process() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/2 framing refused on a Unix socket");
                    this.state = ReadState::Failed(e.clone());
                    return Poll::Ready(Err(e.into()));
                }
            }
            if this.eof {
                // A connection that ends mid-frame ends here too: the server sees EOF.
                return Poll::Ready(Ok(()));
            }
            let filled = this.input.len();
            this.input.resize(filled + READ_CHUNK, 0);
            let mut chunk = ReadBuf::new(&mut this.input[filled..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut chunk);
            let n = chunk.filled().len();
            this.input.truncate(filled + n);
            ready!(polled)?;
            if n == 0 {
                this.eof = true;
            }
        }
    }
}

// Only the client -> server direction is rewritten.
forward_async_write!(AuthorityRewrite<S>, S);

#[cfg(test)]
mod tests;
