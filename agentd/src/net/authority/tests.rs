//! Frames in, frames out: what the server would read after [`AuthorityRewrite`].

use super::*;
use proptest::prelude::*;
use tokio::io::AsyncReadExt;

/// A client byte stream, built frame by frame.
#[derive(Default)]
struct Client(Vec<u8>);

impl Client {
    fn new() -> Self {
        Self(PREFACE.to_vec())
    }

    fn frame(mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Self {
        self.0
            .extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        self.0.push(kind);
        self.0.push(flags);
        self.0.extend_from_slice(&stream.to_be_bytes());
        self.0.extend_from_slice(payload);
        self
    }

    fn headers(self, stream: u32, flags: u8, block: &[u8]) -> Self {
        self.frame(HEADERS, flags | END_HEADERS, stream, block)
    }
}

/// A header block with literal fields (the shape of our own encoder, which the test decoder
/// must read back).
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        encode_literal(&mut out, n.as_bytes(), v.as_bytes());
    }
    out
}

fn request(authority: Option<&str>) -> Vec<u8> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchJWTSVID"),
    ];
    if let Some(a) = authority {
        fields.push((":authority", a));
    }
    fields.push(("workload.spiffe.io", "true"));
    fields.push(("content-type", "application/grpc"));
    block(&fields)
}

/// Yields at most `step` bytes per read, to exercise every split point.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .step
            .min(self.data.len() - self.at)
            .min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

async fn rewrite_in_steps(input: &[u8], step: usize) -> io::Result<Vec<u8>> {
    let mut conn = AuthorityRewrite::new(Trickle {
        data: input.to_vec(),
        at: 0,
        step,
    });
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await?;
    Ok(out)
}

async fn rewrite(input: &[u8]) -> io::Result<Vec<u8>> {
    rewrite_in_steps(input, usize::MAX).await
}

fn framing_error(e: io::Error) -> FramingError {
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    e.into_inner()
        .expect("carries its cause")
        .downcast::<FramingError>()
        .map(|b| *b)
        .expect("a FramingError")
}

/// What the server's side reads: the preface, then frames; header blocks decoded with one
/// decoder for the connection, as the server does.
#[derive(Debug, PartialEq)]
enum Seen {
    Headers {
        stream: u32,
        flags: u8,
        priority: Option<[u8; 5]>,
        fields: Vec<(String, String)>,
    },
    Other {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
}

/// A header block the test's server side is collecting: stream, flags, priority, fragment.
type Collecting = (u32, u8, Option<[u8; 5]>, Vec<u8>);

fn server_reads(out: &[u8]) -> Vec<Seen> {
    assert_eq!(&out[..PREFACE.len()], PREFACE);
    let mut rest = &out[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let mut seen = Vec::new();
    let mut open: Option<Collecting> = None;
    while !rest.is_empty() {
        let h = FrameHeader::parse(&rest[..FRAME_HEADER_LEN]);
        assert!(h.len <= MAX_FRAME_SIZE, "frame of {} bytes", h.len);
        let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len];
        rest = &rest[FRAME_HEADER_LEN + h.len..];
        let end = match h.kind {
            HEADERS => {
                assert!(open.is_none());
                assert_eq!(h.flags & PADDED, 0, "padding is dropped");
                let (priority, fragment) = if h.flags & PRIORITY != 0 {
                    (Some(payload[..5].try_into().unwrap()), &payload[5..])
                } else {
                    (None, payload)
                };
                open = Some((h.stream, h.flags, priority, fragment.to_vec()));
                h.flags & END_HEADERS != 0
            }
            CONTINUATION => {
                let o = open.as_mut().expect("CONTINUATION follows HEADERS");
                assert_eq!(o.0, h.stream);
                o.3.extend_from_slice(payload);
                h.flags & END_HEADERS != 0
            }
            _ => {
                assert!(open.is_none(), "no frame inside a header block");
                seen.push(Seen::Other {
                    kind: h.kind,
                    flags: h.flags,
                    stream: h.stream,
                    payload: payload.to_vec(),
                });
                false
            }
        };
        if end {
            let (stream, flags, priority, fragment) = open.take().unwrap();
            let fields = decoder
                .decode(&fragment)
                .unwrap()
                .into_iter()
                .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                .collect();
            seen.push(Seen::Headers {
                stream,
                flags: flags & (END_STREAM | PRIORITY),
                priority,
                fields,
            });
        }
    }
    assert!(open.is_none(), "header block left open");
    seen
}

fn authority_of(seen: &Seen) -> Option<&str> {
    match seen {
        Seen::Headers { fields, .. } => fields
            .iter()
            .find(|(n, _)| n == ":authority")
            .map(|(_, v)| v.as_str()),
        Seen::Other { .. } => panic!("not a header block: {seen:?}"),
    }
}

#[tokio::test]
async fn every_authority_a_client_sends_becomes_localhost_and_nothing_else_changes() {
    let input = Client::new()
        .frame(0x4, 0, 0, &[]) // SETTINGS
        .headers(1, 0, &request(Some("%2Ftmp%2Fagent%2Fapi.sock"))) // grpc C-core
        .headers(3, 0, &request(Some("/tmp/agent/api.sock"))) // grpc-java, grpc-swift
        .headers(5, 0, &request(Some("localhost"))) // grpc-go, grpc-js
        .headers(7, END_STREAM, &request(None))
        .frame(0x0, END_STREAM, 1, b"\0\0\0\0\x02\x0a\x00") // DATA
        .0;
    let seen = server_reads(&rewrite(&input).await.unwrap());
    assert_eq!(seen.len(), 6);
    assert_eq!(
        seen[0],
        Seen::Other {
            kind: 0x4,
            flags: 0,
            stream: 0,
            payload: vec![]
        }
    );
    for s in &seen[1..4] {
        assert_eq!(authority_of(s), Some("localhost"));
    }
    assert_eq!(authority_of(&seen[4]), None, "absent stays absent");
    let Seen::Headers { fields, flags, .. } = &seen[1] else {
        unreachable!()
    };
    assert_eq!(*flags, 0);
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            ":method",
            ":scheme",
            ":path",
            ":authority",
            "workload.spiffe.io",
            "content-type"
        ],
        "order and the other fields kept"
    );
    assert!(fields.contains(&("workload.spiffe.io".into(), "true".into())));
    let Seen::Headers { flags, .. } = &seen[4] else {
        unreachable!()
    };
    assert_eq!(*flags, END_STREAM, "END_STREAM kept");
    assert_eq!(
        seen[5],
        Seen::Other {
            kind: 0x0,
            flags: END_STREAM,
            stream: 1,
            payload: b"\0\0\0\0\x02\x0a\x00".to_vec()
        }
    );
}

/// RFC 7541 Appendix C.4: three requests with Huffman coding, where the second and third
/// reference the first's `:authority` in the client's dynamic table. A C-core call comes
/// first (literals without indexing: the table stays empty), so the connection is rewritten.
#[tokio::test]
async fn the_clients_dynamic_table_and_huffman_strings_are_followed_across_blocks() {
    let c41 = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
    let c42 = hex::decode("828684be5886a8eb10649cbf").unwrap();
    let c43 = hex::decode("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf").unwrap();
    let input = Client::new()
        .headers(1, END_STREAM, &request(Some("%2Ftmp%2Fagent.sock")))
        .headers(3, END_STREAM, &c41)
        .headers(5, END_STREAM, &c42)
        .headers(7, END_STREAM, &c43)
        .0;
    for step in [usize::MAX, 1, 7] {
        let seen = server_reads(&rewrite_in_steps(&input, step).await.unwrap());
        assert_eq!(seen.len(), 4);
        for s in &seen {
            assert_eq!(authority_of(s), Some("localhost"), "step {step}");
        }
        let Seen::Headers { fields, .. } = &seen[2] else {
            unreachable!()
        };
        assert!(fields.contains(&("cache-control".into(), "no-cache".into())));
        let Seen::Headers { fields, .. } = &seen[3] else {
            unreachable!()
        };
        assert!(fields.contains(&("custom-key".into(), "custom-value".into())));
        assert!(fields.contains(&(":path".into(), "/index.html".into())));
    }
}

/// A connection whose first call names an authority the server accepts is passed through
/// untouched from then on, Huffman strings and the dynamic table included: the same C.4
/// requests reach the server byte for byte, and the server's own decoder reads them.
#[tokio::test]
async fn a_connection_whose_first_authority_is_acceptable_passes_through_untouched() {
    let c41 = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
    let c42 = hex::decode("828684be5886a8eb10649cbf").unwrap();
    let c43 = hex::decode("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf").unwrap();
    let input = Client::new()
        .frame(0x4, 0, 0, &[]) // SETTINGS
        .headers(1, END_STREAM, &c41)
        .headers(3, END_STREAM, &c42)
        .frame(0x0, END_STREAM, 3, b"\0\0\0\0\x00")
        .headers(5, END_STREAM, &c43)
        // Not rewritten any more: the server refuses this call, as it would without us.
        .headers(7, END_STREAM, &request(Some("/tmp/agent.sock")))
        .0;
    for step in [usize::MAX, 1, 7] {
        let out = rewrite_in_steps(&input, step).await.unwrap();
        assert_eq!(out, input, "step {step}");
        let seen = server_reads(&out);
        assert_eq!(authority_of(&seen[1]), Some("www.example.com"));
        assert_eq!(authority_of(&seen[5]), Some("/tmp/agent.sock"));
    }
    // `localhost`, as grpc-go, grpc-js and tonic send it; and no authority at all.
    for first in [request(Some("localhost")), request(None)] {
        let input = Client::new()
            .headers(1, 0, &first)
            .headers(3, 0, &request(Some("%2Fs")))
            .0;
        assert_eq!(rewrite(&input).await.unwrap(), input);
    }
}

#[tokio::test]
async fn a_block_in_continuations_with_padding_and_priority_is_joined_and_kept() {
    let whole = request(Some("%2Fsock"));
    let (a, rest) = whole.split_at(10);
    let (b, c) = rest.split_at(20);
    let mut first = vec![3u8]; // pad length
    first.extend_from_slice(&[0x80, 0, 0, 1, 42]); // exclusive, depends on 1, weight 42
    first.extend_from_slice(a);
    first.extend_from_slice(&[0, 0, 0]);
    let input = Client::new()
        .frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &first)
        .frame(CONTINUATION, 0, 3, b)
        .frame(CONTINUATION, END_HEADERS, 3, c)
        .0;
    for step in [usize::MAX, 1, 5] {
        let seen = server_reads(&rewrite_in_steps(&input, step).await.unwrap());
        assert_eq!(seen.len(), 1);
        let Seen::Headers {
            stream,
            flags,
            priority,
            ..
        } = &seen[0]
        else {
            unreachable!()
        };
        assert_eq!(*stream, 3);
        assert_eq!(*flags, END_STREAM | PRIORITY);
        assert_eq!(*priority, Some([0x80, 0, 0, 1, 42]));
        assert_eq!(authority_of(&seen[0]), Some("localhost"));
    }
}

#[tokio::test]
async fn a_block_that_outgrows_one_frame_when_reencoded_is_split_into_continuations() {
    let big = "x".repeat(20_000);
    let whole = block(&[
        (":method", "POST"),
        (":path", "/p"),
        (":authority", "%2Fsock"),
        ("x-big", &big),
    ]);
    let (a, b) = whole.split_at(MAX_FRAME_SIZE);
    let input = Client::new()
        .frame(HEADERS, 0, 1, a)
        .frame(CONTINUATION, END_HEADERS, 1, b)
        .0;
    let out = rewrite(&input).await.unwrap();
    let seen = server_reads(&out); // asserts every frame <= MAX_FRAME_SIZE
    let Seen::Headers { fields, .. } = &seen[0] else {
        unreachable!()
    };
    assert!(fields.contains(&("x-big".into(), big.clone())));
    assert_eq!(authority_of(&seen[0]), Some("localhost"));
}

#[tokio::test]
async fn large_data_frames_pass_through_byte_for_byte() {
    let body: Vec<u8> = (0..MAX_FRAME_SIZE).map(|i| (i % 251) as u8).collect();
    let mut client = Client::new().headers(1, 0, &request(Some("localhost")));
    for _ in 0..8 {
        client = client.frame(0x0, 0, 1, &body);
    }
    let input = client.frame(0x0, END_STREAM, 1, &body).0;
    let out = rewrite(&input).await.unwrap();
    let header_len = FRAME_HEADER_LEN + request(Some("localhost")).len();
    assert_eq!(
        &out[PREFACE.len() + header_len..],
        &input[PREFACE.len() + header_len..]
    );
}

#[tokio::test]
async fn bad_framing_is_a_connection_error_naming_the_reason() {
    let cases: Vec<(&str, Vec<u8>, FramingError)> = vec![
        (
            "garbage instead of the preface",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            FramingError::BadPreface,
        ),
        (
            "a HEADERS frame longer than the maximum frame size",
            Client::new()
                .frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME_SIZE + 1])
                .0,
            FramingError::FrameTooLarge {
                kind: "HEADERS",
                stream: 1,
                len: MAX_FRAME_SIZE + 1,
                max: MAX_FRAME_SIZE,
            },
        ),
        (
            "a DATA frame inside an open header block",
            Client::new()
                .frame(HEADERS, 0, 1, &request(None)[..5])
                .frame(0x0, 0, 1, b"x")
                .0,
            FramingError::ExpectedContinuation {
                stream: 1,
                got: 0,
                got_stream: 1,
            },
        ),
        (
            "a CONTINUATION with no header block",
            Client::new().frame(CONTINUATION, END_HEADERS, 1, b"").0,
            FramingError::UnexpectedContinuation { stream: 1 },
        ),
        (
            "a PUSH_PROMISE from the client",
            Client::new().frame(PUSH_PROMISE, END_HEADERS, 1, b"").0,
            FramingError::PushPromiseFromClient { stream: 1 },
        ),
        (
            "padding longer than the frame",
            Client::new()
                .frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 1])
                .0,
            FramingError::MalformedHeaders {
                stream: 1,
                reason: "padding longer than the frame",
            },
        ),
        (
            "priority fields cut short",
            Client::new()
                .frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0])
                .0,
            FramingError::MalformedHeaders {
                stream: 1,
                reason: "too short for its priority fields",
            },
        ),
    ];
    for (what, input, want) in cases {
        for step in [usize::MAX, 1] {
            let err = rewrite_in_steps(&input, step).await.expect_err(what);
            assert_eq!(framing_error(err), want, "{what}");
        }
    }
    // A block that does not decode: index 70 is past the static table, and the dynamic one
    // is empty.
    let err = rewrite(&Client::new().headers(1, 0, &[0x80 | 70]).0)
        .await
        .unwrap_err();
    assert!(
        matches!(framing_error(err), FramingError::Hpack { stream: 1, .. }),
        "index out of range"
    );
    // A dynamic table larger than the server allows.
    let mut update = Vec::new();
    encode_integer(&mut update, 1 << 20, 5, 0x20);
    let err = rewrite(&Client::new().headers(1, 0, &update).0)
        .await
        .unwrap_err();
    assert!(matches!(
        framing_error(err),
        FramingError::Hpack { stream: 1, .. }
    ));
}

#[tokio::test]
async fn huge_header_blocks_and_lists_are_refused_not_buffered() {
    // Many CONTINUATION frames: refused once the block passes the limit.
    let mut client = Client::new().frame(HEADERS, 0, 1, &[0; 1000]);
    for _ in 0..(MAX_HEADER_BLOCK / MAX_FRAME_SIZE + 1) {
        client = client.frame(CONTINUATION, 0, 1, &vec![0; MAX_FRAME_SIZE]);
    }
    let err = rewrite(&client.0).await.unwrap_err();
    assert_eq!(
        framing_error(err),
        FramingError::HeaderBlockTooLarge {
            stream: 1,
            max: MAX_HEADER_BLOCK
        }
    );
    // A small block that expands: one 4 KB field in the dynamic table, then indexed 100
    // times (one byte each).
    let mut b = vec![0x40]; // literal with incremental indexing, new name
    encode_integer(&mut b, 3, 7, 0);
    b.extend_from_slice(b"x-a");
    encode_integer(&mut b, 3900, 7, 0);
    b.extend(std::iter::repeat_n(b'a', 3900));
    b.extend(std::iter::repeat_n(0x80 | 62, 100));
    let err = rewrite(&Client::new().headers(1, 0, &b).0)
        .await
        .unwrap_err();
    assert_eq!(
        framing_error(err),
        FramingError::HeaderListTooLarge {
            stream: 1,
            max: MAX_HEADER_LIST
        }
    );
}

#[tokio::test]
async fn a_connection_that_ends_mid_frame_ends_cleanly() {
    let whole = Client::new().headers(1, 0, &request(Some("%2Fs"))).0;
    for cut in 0..whole.len() {
        let out = rewrite(&whole[..cut]).await.unwrap();
        assert!(out.len() <= cut.max(PREFACE.len()));
    }
}

#[test]
fn integers_encode_per_rfc7541_c1() {
    // C.1.1: 10 with a 5-bit prefix; C.1.2: 1337 with a 5-bit prefix; C.1.3: 42 at 8 bits.
    let mut out = Vec::new();
    encode_integer(&mut out, 10, 5, 0);
    assert_eq!(out, [0x0a]);
    out.clear();
    encode_integer(&mut out, 1337, 5, 0);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    out.clear();
    encode_integer(&mut out, 42, 8, 0);
    assert_eq!(out, [0x2a]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes after the preface, random mutations of a valid stream and random cuts:
    /// an error or a clean end, never a panic, and never more out than in plus what
    /// re-encoding may add.
    #[test]
    fn random_framing_never_panics(
        tail in proptest::collection::vec(any::<u8>(), 0..4096),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        step in 1usize..64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut random = PREFACE.to_vec();
        random.extend_from_slice(&tail);
        let mut mutated = Client::new()
            .frame(0x4, 0, 0, &[])
            .headers(1, 0, &request(Some("%2Fs")))
            .frame(CONTINUATION, END_HEADERS, 1, b"")
            .headers(3, END_STREAM, &request(None))
            .0;
        for (at, byte) in flips {
            let len = mutated.len();
            mutated[at % len] ^= byte;
        }
        for input in [random, mutated] {
            let result = rt.block_on(rewrite_in_steps(&input, step));
            if let Ok(out) = result {
                prop_assert!(out.len() <= input.len() * 8 + 1024);
            }
        }
    }
}
