//! Fuzz-style property tests that run in the normal test run: seeded random, truncated and
//! bit-flipped inputs for the frontend-message parser, the startup parser, the `options` parser
//! and a whole session. Asserts that nothing panics, that parsing is consistent (incomplete input
//! consumes nothing; parsed messages re-encode to the same message), and, through a counting
//! global allocator, that no single allocation exceeds what the configured limits allow.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use pq_proto::startup::{parse_options, split_options, MAX_STARTUP_PACKET_LENGTH_BYTES};
use pq_proto::{
    BackendConfig, CancelKey, CleartextPasswordAuth, CopyMessage, FeMessage, FeStartupPacket, FieldDescription,
    MessageLimits, PostgresBackend, ProtocolError, QueryError, QueryHandler, StartupParams, TrustAuth, UserError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---- allocation tracking -------------------------------------------------------------------

/// Records the largest single allocation made by the current thread while tracking is on.
/// Per-thread, so tests running in parallel do not see each other's allocations.
struct TrackingAllocator;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST_ALLOCATION_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn note_allocation(size: usize) {
    // `try_with`: thread-locals may be gone while a thread shuts down.
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            let _ = LARGEST_ALLOCATION_BYTES.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `f` and returns its result with the largest single allocation it made.
fn tracking_allocations<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST_ALLOCATION_BYTES.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let result = f();
    TRACKING.with(|t| t.set(false));
    (result, LARGEST_ALLOCATION_BYTES.with(Cell::get))
}

// ---- input generation ----------------------------------------------------------------------

const SEED: u64 = 0x5eed_0f9a_9e00;

/// Small limits, so that "too large" is reached often and allocation bounds are tight.
const LIMITS: MessageLimits = MessageLimits { max_message_size_bytes: 4 << 10, max_copy_data_size_bytes: 16 << 10 };

fn random_string(rng: &mut StdRng, max_len: usize) -> String {
    const ALPHABET: &[char] = &['a', 'b', 'Z', '0', ' ', '\\', '=', '-', 'c', '\t', 'é', ';'];
    let len = rng.gen_range(0..=max_len);
    (0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())]).collect()
}

fn random_bytes(rng: &mut StdRng, max_len: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max_len);
    (0..len).map(|_| rng.gen()).collect()
}

fn random_fe_message(rng: &mut StdRng) -> FeMessage {
    match rng.gen_range(0..10) {
        0 => FeMessage::Query(random_string(rng, 64)),
        1 => FeMessage::Terminate,
        2 => FeMessage::PasswordMessage(Bytes::from(random_bytes(rng, 32))),
        3 => FeMessage::CopyData(Bytes::from(random_bytes(rng, 256))),
        4 => FeMessage::CopyDone,
        5 => FeMessage::CopyFail(random_string(rng, 16)),
        6 => FeMessage::Sync,
        7 => FeMessage::Flush,
        8 => FeMessage::ExtendedQuery { tag: [b'P', b'B', b'D', b'E', b'C', b'F'][rng.gen_range(0..6)] },
        _ => FeMessage::Query(format!("select {}", rng.gen::<u32>())),
    }
}

fn random_startup_packet(rng: &mut StdRng) -> FeStartupPacket {
    match rng.gen_range(0..6) {
        0 => FeStartupPacket::SslRequest,
        1 => FeStartupPacket::GssEncRequest,
        2 => FeStartupPacket::CancelRequest(CancelKey { process_id: rng.gen(), secret_key: rng.gen() }),
        _ => {
            let mut pairs = vec![("user".to_string(), format!("u{}", rng.gen::<u8>()))];
            for _ in 0..rng.gen_range(0..4) {
                pairs.push((format!("p{}", rng.gen::<u8>()), random_string(rng, 20)));
            }
            if rng.gen_bool(0.5) {
                let opts: Vec<String> =
                    (0..rng.gen_range(0..4)).map(|i| format!("-c k{i}=v\\ {}", rng.gen::<u16>())).collect();
                pairs.push(("options".to_string(), opts.join(" ")));
            }
            FeStartupPacket::Startup {
                protocol_minor: rng.gen_range(0..3),
                params: StartupParams::from_pairs(pairs).expect("generated params are valid"),
            }
        }
    }
}

/// Damages a valid encoding the ways a broken or hostile peer would.
fn mutate(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    match rng.gen_range(0..6) {
        // Truncate anywhere.
        0 => {
            let cut = rng.gen_range(0..=bytes.len());
            bytes.truncate(cut);
        }
        // Flip a few bits.
        1 | 2 => {
            if !bytes.is_empty() {
                for _ in 0..rng.gen_range(1..=8) {
                    let i = rng.gen_range(0..bytes.len());
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
            }
        }
        // Overwrite a 4-byte window (often a length field) with an extreme value.
        3 => {
            if bytes.len() >= 5 {
                let extreme = [i32::MAX, i32::MIN, -1, 0, 3, 4, 5, 10_001, 1 << 20];
                let value = extreme[rng.gen_range(0..extreme.len())];
                let at = rng.gen_range(0..=bytes.len() - 4);
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
        }
        // Entirely random bytes.
        4 => bytes = random_bytes(rng, 64),
        // Valid prefix followed by garbage.
        _ => bytes.extend(random_bytes(rng, 16)),
    }
    bytes
}

// ---- properties ----------------------------------------------------------------------------

/// Parses everything in `input`, checking the parser's contract on each step.
fn parse_frontend_stream(input: &[u8]) -> Result<usize, ProtocolError> {
    let mut buf = BytesMut::from(input);
    let mut parsed = 0;
    loop {
        let before = buf.len();
        match FeMessage::parse(&mut buf, &LIMITS)? {
            None => {
                assert_eq!(buf.len(), before, "incomplete input must not be consumed");
                return Ok(parsed);
            }
            Some(msg) => {
                parsed += 1;
                let mut again = BytesMut::new();
                msg.write(&mut again).expect("parsed messages re-encode");
                assert_eq!(FeMessage::parse(&mut again, &LIMITS), Ok(Some(msg)), "re-encoding round-trips");
            }
        }
    }
}

fn parse_startup(input: &[u8]) -> Result<Option<FeStartupPacket>, ProtocolError> {
    let mut buf = BytesMut::from(input);
    let before = buf.len();
    let result = FeStartupPacket::parse(&mut buf);
    if let Ok(None) = result {
        assert_eq!(buf.len(), before, "incomplete input must not be consumed");
    }
    if let Ok(Some(packet)) = &result {
        let mut again = BytesMut::new();
        packet.write(&mut again).expect("parsed packets re-encode");
        assert_eq!(FeStartupPacket::parse(&mut again).as_ref(), Ok(&Some(packet.clone())));
    }
    result
}

/// Allocation bound for parsing `input`: the parser may copy at most one frame's body (which
/// the limits bound), never anything sized from an unchecked length field.
fn parse_allocation_bound_bytes(input_len: usize) -> usize {
    // BytesMut::from(input) copies the input itself; frames are bounded by the limits.
    input_len.max(LIMITS.max_copy_data_size_bytes) + 64
}

#[test]
fn fuzz_frontend_message_parser() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let cases = 60_000;
    let (mut ok, mut err) = (0, 0);
    let mut largest_allocation_bytes = 0;
    for _ in 0..cases {
        let mut input = Vec::new();
        for _ in 0..rng.gen_range(1..4) {
            let mut buf = BytesMut::new();
            random_fe_message(&mut rng).write(&mut buf).expect("encodes");
            input.extend_from_slice(&buf);
        }
        let input = if rng.gen_bool(0.8) { mutate(&mut rng, input) } else { input };
        let (result, largest) = tracking_allocations(|| parse_frontend_stream(&input));
        assert!(
            largest <= parse_allocation_bound_bytes(input.len()),
            "allocated {largest} bytes for a {}-byte input",
            input.len()
        );
        largest_allocation_bytes = largest_allocation_bytes.max(largest);
        match result {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert_eq!(ok + err, cases);
    // Both outcomes must be well represented, or the generator is not exercising the parser.
    assert!(ok > cases / 10 && err > cases / 10, "ok={ok} err={err}");
    eprintln!(
        "frontend parser: {cases} cases, {ok} ok, {err} errors, largest allocation {largest_allocation_bytes} bytes"
    );
}

#[test]
fn fuzz_startup_parser() {
    let mut rng = StdRng::seed_from_u64(SEED ^ 1);
    let cases = 60_000;
    let (mut ok, mut err) = (0, 0);
    for _ in 0..cases {
        let mut buf = BytesMut::new();
        random_startup_packet(&mut rng).write(&mut buf).expect("encodes");
        let input = if rng.gen_bool(0.8) { mutate(&mut rng, buf.to_vec()) } else { buf.to_vec() };
        let (result, largest) = tracking_allocations(|| parse_startup(&input));
        assert!(
            largest <= input.len().max(MAX_STARTUP_PACKET_LENGTH_BYTES) + 64,
            "allocated {largest} bytes for a {}-byte startup packet",
            input.len()
        );
        match result {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    assert!(ok > cases / 10 && err > cases / 10, "ok={ok} err={err}");
    eprintln!("startup parser: {cases} cases, {ok} ok, {err} errors");
}

/// Escapes a word the way a client must for `pg_split_opts`.
fn escape_option_word(word: &str) -> String {
    let mut out = String::new();
    for c in word.chars() {
        if c == '\\' || c.is_ascii_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[test]
fn fuzz_options_parser() {
    const TOKENS: &[&str] = &["-c", " ", "  ", "--", "key", "k-2", "=", "val", "\\", "\\ ", "-", "x", "\t", "é"];
    let mut rng = StdRng::seed_from_u64(SEED ^ 2);
    let cases = 40_000;
    let (mut random_ok, mut round_trips) = (0, 0);
    for case in 0..cases {
        if case % 2 == 0 {
            // Arbitrary token soup: must never panic; settings must have sane names.
            let raw: String = (0..rng.gen_range(0..12)).map(|_| TOKENS[rng.gen_range(0..TOKENS.len())]).collect();
            let _ = split_options(&raw);
            if let Ok(settings) = parse_options(&raw) {
                random_ok += 1;
                assert!(settings.iter().all(|(k, _)| !k.is_empty() && !k.contains('-')));
            }
        } else {
            // Settings with awkward values survive escaping, in every accepted switch form.
            let settings: Vec<(String, String)> =
                (0..rng.gen_range(0..4)).map(|i| (format!("name_{i}"), random_string(&mut rng, 12))).collect();
            let raw: Vec<String> = settings
                .iter()
                .map(|(k, v)| {
                    let kv = escape_option_word(&format!("{k}={v}"));
                    match rng.gen_range(0..3) {
                        0 => format!("-c {kv}"),
                        1 => format!("-c{kv}"),
                        _ => format!("--{kv}"),
                    }
                })
                .collect();
            let raw = raw.join(&" ".repeat(rng.gen_range(1..3)));
            assert_eq!(parse_options(&raw).as_ref(), Ok(&settings), "{raw:?}");
            round_trips += 1;
        }
    }
    assert!(random_ok > 0);
    eprintln!("options parser: {cases} cases, {random_ok} random inputs parsed, {round_trips} round trips");
}

/// The worst length fields are refused from the header, without allocating anything.
#[test]
fn hostile_length_fields_allocate_nothing() {
    // The tracker itself works.
    let (v, largest) = tracking_allocations(|| vec![1u8; 1 << 20]);
    assert!(largest >= 1 << 20 && v.len() == 1 << 20);

    for header in
        [&[b'd', 0x7f, 0xff, 0xff, 0xff][..], &[b'Q', 0x7f, 0xff, 0xff, 0xff][..], &[b'Q', 0x80, 0x00, 0x00, 0x00][..]]
    {
        let mut buf = BytesMut::from(header);
        let (result, largest) = tracking_allocations(|| FeMessage::parse(&mut buf, &LIMITS));
        assert!(result.is_err());
        assert_eq!(largest, 0, "no allocation for {header:?}");
    }
    let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
    let (result, largest) = tracking_allocations(|| FeStartupPacket::parse(&mut buf));
    assert!(matches!(result, Err(ProtocolError::MessageTooLarge { tag: 0, .. })));
    assert_eq!(largest, 0);
}

// ---- whole sessions over in-memory streams ---------------------------------------------------

/// Answers every query with a row, and echoes COPY BOTH, so fuzzed sessions reach every state.
struct EchoHandler;

impl QueryHandler for EchoHandler {
    async fn process_query(&mut self, pgb: &mut PostgresBackend, query: &str) -> Result<(), QueryError> {
        if query.starts_with('c') {
            pgb.start_copy_both().await?;
            loop {
                match pgb.read_copy_message().await? {
                    CopyMessage::Data(d) => pgb.write_copy_data(&d).await?,
                    CopyMessage::Done => break,
                    CopyMessage::Fail(m) => return Err(UserError::internal(m).into()),
                }
            }
            pgb.finish_copy("COPY").await?;
        } else {
            pgb.write_row_set(&[FieldDescription::text("q")], [[Some(query)]]).await?;
        }
        Ok(())
    }
}

#[test]
fn fuzz_whole_sessions() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut rng = StdRng::seed_from_u64(SEED ^ 3);
    let cases = 5_000;
    let write_flush_threshold_bytes = 4 << 10;
    let config = BackendConfig {
        limits: LIMITS,
        write_buffer_flush_threshold_bytes: write_flush_threshold_bytes,
        ..BackendConfig::default()
    };
    let (mut ended_ok, mut ended_err) = (0, 0);
    for _ in 0..cases {
        let mut input = BytesMut::new();
        let params = StartupParams::from_pairs([("user".to_string(), "fuzz".to_string())]).expect("valid");
        FeStartupPacket::Startup { protocol_minor: 0, params }.write(&mut input).expect("encodes");
        let use_password = rng.gen_bool(0.5);
        if use_password {
            let password: &[u8] = if rng.gen_bool(0.7) { b"pw\0" } else { b"wrong\0" };
            FeMessage::PasswordMessage(Bytes::from_static(password)).write(&mut input).expect("encodes");
        }
        for _ in 0..rng.gen_range(0..12) {
            let msg =
                if rng.gen_bool(0.2) { FeMessage::Query("copy".to_string()) } else { random_fe_message(&mut rng) };
            msg.write(&mut input).expect("encodes");
        }
        let input = if rng.gen_bool(0.7) { mutate(&mut rng, input.to_vec()) } else { input.to_vec() };
        let input_len = input.len();
        let stream = tokio::io::join(Cursor::new(input), tokio::io::sink());
        let pgb = PostgresBackend::new(stream, config.clone());
        let (result, largest) = tracking_allocations(|| {
            if use_password {
                let auth = CleartextPasswordAuth(|_: &StartupParams, pw: &str| {
                    if pw == "pw" {
                        Ok(())
                    } else {
                        Err(UserError::invalid_password("wrong password"))
                    }
                });
                runtime.block_on(pgb.run(&auth, &mut EchoHandler))
            } else {
                runtime.block_on(pgb.run(&TrustAuth, &mut EchoHandler))
            }
        });
        // Read buffer: one frame plus a read chunk; write buffer: the flush threshold plus one
        // echoed frame; either possibly doubled by BytesMut growth. Plus the input itself.
        let read_buf_bytes = LIMITS.max_copy_data_size_bytes + (8 << 10);
        let write_buf_bytes = write_flush_threshold_bytes + LIMITS.max_copy_data_size_bytes;
        let bound = 2 * read_buf_bytes.max(write_buf_bytes) + input_len + 4096;
        assert!(largest <= bound, "session allocated {largest} bytes (bound {bound})");
        match result {
            Ok(_) => ended_ok += 1,
            Err(_) => ended_err += 1,
        }
    }
    assert!(ended_ok > 0 && ended_err > 0, "ok={ended_ok} err={ended_err}");
    eprintln!("whole sessions: {cases} cases, {ended_ok} ended cleanly, {ended_err} with errors");
}
