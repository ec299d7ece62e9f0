//! Bad input from a hand-written raw client (real clients never send it),
//! against `nbdhost --handshake-timeout 2 memory 1M`: every malformed
//! option or request gets exactly the reply the protocol names, or a
//! closed connection with a logged reason; the session goes on wherever
//! the protocol lets it; and no other client, nor the server, is harmed.
//! Also checks the wire formats real clients rely on: pipelined batches,
//! extended headers, structured read chunks and block status.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nbdhost_tests::raw::*;
use nbdhost_tests::{client, export_size, pattern, run_ok, Server};

const SIZE: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(5);

fn server() -> Server {
    Server::start(&["--handshake-timeout", "2", "memory", "1M"])
}

/// A real client (qemu-io) writes and reads back `byte` at 512 KiB.
fn good_client_works(s: &Server, byte: u8) {
    let w = format!("write -P {byte} 512k 4k");
    let r = format!("read -P {byte} 512k 4k");
    let out = run_ok(
        client("qemu-io")
            .args(["-f", "raw", "-c", &w, "-c", &r])
            .arg(s.uri()),
    );
    assert!(out.contains("read 4096/4096"), "{out}");
}

/// The server is still up, has not panicked, and stops cleanly.
fn finish(mut s: Server) {
    assert!(s.is_running(), "server exited: {}", s.log_text());
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(s.stop().success(), "{log}");
}

fn assert_log(s: &Server, needle: &str) {
    let (found, log) = s.wait_log(needle, LOG_WAIT);
    assert!(found, "log lacks {needle:?}:\n{log}");
}

/// A successful reply without data, in whichever style the server chose.
fn expect_ok(c: &mut RawClient, cookie: u64) {
    match c.reply() {
        Reply::Simple { error, cookie: k } => assert_eq!((error, k), (0, cookie)),
        Reply::Chunk(ch) => {
            assert_eq!((ch.typ, ch.cookie), (REPLY_TYPE_NONE, cookie), "{ch:?}");
            assert!(ch.done());
        }
    }
}

/// A simple-style error reply with `cookie`, and nothing after it.
fn expect_simple_error(c: &mut RawClient, cookie: u64, errno: u32, what: &str) {
    assert_eq!(c.simple(), (errno, cookie), "{what}");
}

/// A final error chunk for `cookie` carrying `errno` and a message.
fn expect_error_chunk(c: &mut RawClient, cookie: u64, errno: u32, what: &str) {
    let ch = c.chunk();
    assert_eq!(
        (ch.typ, ch.cookie),
        (REPLY_TYPE_ERROR, cookie),
        "{what}: {ch:?}"
    );
    assert!(ch.done(), "{what}: error chunk ends the reply");
    let (e, msg) = ch.error();
    assert_eq!(e, errno, "{what}: {msg}");
    assert!(!msg.is_empty(), "{what}: the error chunk explains itself");
}

// ---------------------------------------------------------------------------
// Handshake

#[test]
fn unknown_options_are_unsupported_and_negotiation_continues() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    // 4 is the withdrawn NBD_OPT_PEEK_EXPORT; the rest were never defined.
    for opt in [99, 0, 4, 0x7fff_ffff, 0xffff_ffff] {
        let r = c.expect_opt(opt, b"whatever", REP_ERR_UNSUP);
        assert!(r.data.len() < 4096);
    }
    c.expect_opt(42, &[], REP_ERR_UNSUP);
    let f = c.go();
    assert_eq!(f.size, SIZE);
    assert_ne!(f.flags & TF_HAS_FLAGS, 0);
    assert_eq!(f.flags & TF_READ_ONLY, 0);
    c.write(1, 0, b"still here");
    expect_ok(&mut c, 1);
    assert_eq!(c.read_ok(2, 0, 10), b"still here");
    finish(s);
}

#[test]
fn an_oversized_option_is_too_big_and_its_payload_skipped() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    // 1 MiB of NBD_OPT_ABORT headers: were any of it parsed as options,
    // the server would end the session.
    let payload: Vec<u8> = std::iter::repeat_n(option_bytes(OPT_ABORT, &[]), 1 << 16)
        .flatten()
        .collect();
    assert_eq!(payload.len(), 1 << 20);
    c.option(OPT_GO, &payload);
    let r = c.opt_reply();
    assert_eq!((r.option, r.typ), (OPT_GO, REP_ERR_TOO_BIG), "{r:?}");
    // Just over the limit is too big as well.
    c.option(OPT_INFO, &vec![0u8; 64 * 1024 + 1]);
    assert_eq!(c.opt_reply().typ, REP_ERR_TOO_BIG);
    // The session goes on: list, then go.
    c.option(OPT_LIST, &[]);
    let list = c.opt_replies();
    assert_eq!(list.last().unwrap().typ, REP_ACK, "{list:?}");
    assert!(list[..list.len() - 1].iter().all(|r| r.typ == REP_SERVER));
    assert_eq!(c.go().size, SIZE);
    assert_eq!(c.read_ok(1, 4096, 16), vec![0u8; 16]);
    finish(s);
}

#[test]
fn an_over_long_export_name_closes_the_connection() {
    let s = server();
    for len in [100 * 1024, 5000] {
        let mut c = RawClient::connect(&s.socket);
        // The server may close before taking it all.
        let _ =
            c.s.write_all(&option_bytes(OPT_EXPORT_NAME, &vec![b'x'; len]));
        let got = c.wait_closed();
        assert!(got.is_empty(), "nothing is sent back: {got:?}");
    }
    assert_log(&s, "too long");
    good_client_works(&s, 0x11);
    finish(s);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    let mut b = Vec::new();
    b.extend(0x0123_4567_89ab_cdefu64.to_be_bytes());
    b.extend(OPT_GO.to_be_bytes());
    b.extend(0u32.to_be_bytes());
    c.send(&b);
    assert!(c.wait_closed().is_empty());
    assert_log(&s, "bad magic");
    good_client_works(&s, 0x12);
    finish(s);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let s = server();
    let mut c = RawClient::greeted(&s.socket);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.wait_closed().is_empty());
    assert_log(&s, "unknown handshake flags");
    finish(s);
}

#[test]
fn info_and_go_with_inconsistent_lengths_are_invalid() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    let mut two_counted_one_sent = Vec::new();
    put_name(&mut two_counted_one_sent, b"");
    two_counted_one_sent.extend(2u16.to_be_bytes());
    two_counted_one_sent.extend(INFO_NAME.to_be_bytes());
    let mut trailing = info_request("", &[INFO_NAME]);
    trailing.push(0);
    let bad: [(&str, Vec<u8>); 6] = [
        ("name longer than the option", vec![0, 0, 0, 9, 0, 0]),
        ("name length past the end", vec![0xff, 0xff, 0xff, 0xff]),
        ("no request count", vec![0, 0, 0, 0]),
        ("empty payload", vec![]),
        ("count 2, one request", two_counted_one_sent),
        ("a trailing byte", trailing),
    ];
    for opt in [OPT_INFO, OPT_GO] {
        for (what, data) in &bad {
            c.option(opt, data);
            let r = c.opt_reply();
            assert_eq!((r.option, r.typ), (opt, REP_ERR_INVALID), "{what}: {r:?}");
        }
    }
    // Still negotiating: a good INFO, which does not end negotiation...
    let f = c.info(OPT_INFO, "", &[INFO_NAME, INFO_BLOCK_SIZE]);
    assert_eq!(f.size, SIZE);
    assert!(f.name.is_some());
    let (min, pref, max) = f.block_size.expect("block size");
    assert!(min >= 1 && min <= pref && pref <= max, "{min} {pref} {max}");
    // ...then GO.
    assert_eq!(c.go().size, SIZE);
    assert_eq!(c.read_ok(1, 0, 8), vec![0u8; 8]);
    finish(s);
}

#[test]
fn list_with_data_is_invalid() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    c.expect_opt(OPT_LIST, b"x", REP_ERR_INVALID);
    c.expect_opt(OPT_LIST, &[0, 0, 0, 0], REP_ERR_INVALID);
    c.option(OPT_LIST, &[]);
    let list = c.opt_replies();
    assert_eq!(list.last().unwrap().typ, REP_ACK, "{list:?}");
    assert!(list.iter().all(|r| r.option == OPT_LIST));
    assert_eq!(c.go().size, SIZE);
    finish(s);
}

#[test]
fn meta_contexts_need_structured_replies_first() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    let meta = meta_request("", &["base:allocation"]);
    c.expect_opt(OPT_SET_META_CONTEXT, &meta, REP_ERR_INVALID);
    c.expect_opt(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    c.expect_opt(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &meta);
    let r = c.opt_replies();
    assert_eq!(
        r.iter().map(|r| r.typ).collect::<Vec<_>>(),
        vec![REP_META_CONTEXT, REP_ACK],
        "{r:?}"
    );
    assert_eq!(&r[0].data[4..], b"base:allocation");
    // A malformed query is invalid too, and negotiation goes on.
    let mut bad = meta_request("", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    c.expect_opt(OPT_SET_META_CONTEXT, &bad, REP_ERR_INVALID);
    assert_eq!(c.go().size, SIZE);
    finish(s);
}

#[test]
fn starttls_without_tls_is_refused_by_policy() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    c.expect_opt(OPT_STARTTLS, &[], REP_ERR_POLICY);
    // Still plain, still negotiating.
    assert_eq!(c.go().size, SIZE);
    assert_eq!(c.read_ok(1, 0, 8), vec![0u8; 8]);
    finish(s);
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    c.expect_opt(99, &[], REP_ERR_UNSUP);
    c.expect_opt(OPT_ABORT, &[], REP_ACK);
    assert!(c.wait_closed().is_empty(), "nothing after the ACK");
    good_client_works(&s, 0x13);
    finish(s);
}

#[test]
fn a_flood_of_options_is_cut_off() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    let flood: Vec<u8> = std::iter::repeat_n(option_bytes(99, &[]), 2000)
        .flatten()
        .collect();
    let _ = c.s.write_all(&flood);
    let got = c.wait_closed();
    // Count the UNSUP replies that came before the close.
    let mut n = 0;
    let mut b = &got[..];
    while b.len() >= 20 {
        assert_eq!(
            u32::from_be_bytes(b[12..16].try_into().unwrap()),
            REP_ERR_UNSUP
        );
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        b = &b[20 + len..];
        n += 1;
    }
    assert!(b.is_empty(), "whole replies only");
    assert!((1..2000).contains(&n), "{n} options answered");
    assert_log(&s, "options");
    good_client_works(&s, 0x14);
    finish(s);
}

#[test]
fn handshake_timeout_drops_silent_and_slow_clients_only() {
    let s = server();
    let t0 = Instant::now();
    // Connects and never says anything.
    let mut silent = RawClient::connect_only(&s.socket);
    // Keeps the server busy with an option every 200 ms, but never
    // finishes negotiating.
    let mut slow = RawClient::connect(&s.socket);
    // Finishes the handshake, then idles past the timeout.
    let mut idle = RawClient::connect(&s.socket);
    idle.go();

    let slow_thread = std::thread::spawn(move || {
        let t = Instant::now();
        let mut answered = 0;
        loop {
            assert!(t.elapsed() < Duration::from_secs(8), "slow client kept");
            if slow.s.write_all(&option_bytes(99, &[])).is_err() {
                break;
            }
            let mut h = [0u8; 20];
            if slow.s.read_exact(&mut h).is_err() {
                break;
            }
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            if slow.s.read_exact(&mut d).is_err() {
                break;
            }
            answered += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        (t.elapsed(), answered)
    });

    let got = silent.wait_closed();
    let silent_after = t0.elapsed();
    assert_eq!(got.len(), 18, "just the greeting");
    assert!(
        silent_after >= Duration::from_millis(1500) && silent_after < Duration::from_secs(5),
        "silent client dropped after {silent_after:?}"
    );
    let (slow_after, answered) = slow_thread.join().unwrap();
    assert!(answered >= 3, "slow client's options were answered");
    assert!(
        slow_after < Duration::from_secs(5),
        "slow client dropped after {slow_after:?}"
    );
    assert_log(&s, "timed out");

    // The timeout is for the handshake only.
    let wait = Duration::from_secs(3).saturating_sub(t0.elapsed());
    std::thread::sleep(wait);
    assert_eq!(idle.read_ok(1, 0, 8), vec![0u8; 8]);
    good_client_works(&s, 0x15);
    finish(s);
}

// ---------------------------------------------------------------------------
// Transmission with simple replies

fn transmitting(s: &Server) -> RawClient {
    let mut c = RawClient::connect(&s.socket);
    let f = c.go();
    assert_eq!(f.size, SIZE);
    c
}

#[test]
fn out_of_range_requests_get_einval_and_the_connection_goes_on() {
    let s = server();
    let mut c = transmitting(&s);
    c.request(0, CMD_READ, 2, SIZE - 8, 16);
    expect_simple_error(&mut c, 2, EINVAL, "read across the end");
    // No data followed the error: the next reply is well-formed.
    c.write(3, SIZE - 8, b"lastbyte");
    expect_ok(&mut c, 3);
    assert_eq!(c.read_ok(4, SIZE - 8, 8), b"lastbyte");
    c.request(0, CMD_READ, 5, SIZE, 1);
    expect_simple_error(&mut c, 5, EINVAL, "read at the end");
    c.request(0, CMD_READ, 6, u64::MAX - 4, 512);
    expect_simple_error(&mut c, 6, EINVAL, "read whose end overflows");
    c.request(0, CMD_TRIM, 7, SIZE - 512, 1024);
    expect_simple_error(&mut c, 7, EINVAL, "trim across the end");
    c.write(8, SIZE - 2, b"four");
    expect_simple_error(&mut c, 8, ENOSPC, "write across the end");
    assert_eq!(c.read_ok(9, SIZE - 8, 8), b"lastbyte", "nothing written");
    finish(s);
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let s = server();
    let mut c = transmitting(&s);
    let cases: [(u16, u16, u64, u32, &str); 10] = [
        (0, 42, 0, 0, "unknown command 42"),
        (0, 0xffff, 0, 512, "unknown command 0xffff"),
        (CMD_FLAG_REQ_ONE, CMD_READ, 0, 512, "REQ_ONE on a read"),
        (CMD_FLAG_FUA, CMD_READ, 0, 512, "FUA on a read"),
        (CMD_FLAG_DF, CMD_READ, 0, 512, "DF in simple mode"),
        (1 << 15, CMD_FLUSH, 0, 0, "unknown flag on a flush"),
        (0, CMD_FLUSH, 4096, 0, "flush with an offset"),
        (0, CMD_FLUSH, 0, 512, "flush with a length"),
        (0, CMD_READ, 0, 0, "zero-length read"),
        (0, CMD_BLOCK_STATUS, 0, 4096, "block status, no context"),
    ];
    for (i, (flags, cmd, offset, len, what)) in cases.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request(flags, cmd, cookie, offset, len);
        expect_simple_error(&mut c, cookie, EINVAL, what);
    }
    // The connection is fine.
    c.request(0, CMD_FLUSH, 1, 0, 0);
    expect_ok(&mut c, 1);
    c.write(2, 0, &pattern(4096, 1));
    expect_ok(&mut c, 2);
    assert_eq!(c.read_ok(3, 0, 4096), pattern(4096, 1));
    finish(s);
}

#[test]
fn an_oversized_write_is_eoverflow_and_its_payload_skipped() {
    let s = server();
    let mut c = transmitting(&s);
    // 33 MiB of FLUSH requests with cookie 0xdead: were any of it parsed as
    // requests, their replies would show up.
    let junk = request_bytes(0, CMD_FLUSH, 0xdead, 0, 0, &[]);
    let big: Vec<u8> = junk.iter().copied().cycle().take(33 << 20).collect();
    let t = Instant::now();
    c.send(&request_bytes(0, CMD_WRITE, 7, 0, big.len() as u32, &big));
    expect_simple_error(&mut c, 7, EOVERFLOW, "33 MiB write");
    assert_eq!(c.read_ok(8, 0, 4096), vec![0u8; 4096], "nothing written");
    // Exactly 32 MiB is not too big, only beyond this disk.
    let max = vec![0x5au8; 32 << 20];
    c.send(&request_bytes(0, CMD_WRITE, 9, 0, max.len() as u32, &max));
    expect_simple_error(&mut c, 9, ENOSPC, "32 MiB write on a 1 MiB disk");
    assert_eq!(c.read_ok(10, 0, 4096), vec![0u8; 4096]);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    finish(s);
}

#[test]
fn bad_request_magic_closes_that_connection_with_a_reason() {
    let s = server();
    let mut other = transmitting(&s);
    let mut c = transmitting(&s);
    assert_eq!(c.read_ok(1, 0, 512), vec![0u8; 512]);
    // A hard disconnect: the protocol does not ask for a reply.
    c.send(&[0x55; 28]);
    assert!(c.wait_closed().is_empty(), "no reply to garbage");
    assert_log(&s, "bad magic");
    // Extended magic without extended headers is just as bad.
    let mut c = transmitting(&s);
    c.send(&ext_request_bytes(0, CMD_READ, 2, 0, 512, &[]));
    assert!(c.wait_closed().is_empty());
    assert_eq!(other.read_ok(3, 0, 16), vec![0u8; 16]);
    good_client_works(&s, 0x16);
    finish(s);
}

#[test]
fn a_pipelined_batch_is_answered_cookie_by_cookie() {
    let s = server();
    let mut c = transmitting(&s);
    const N: u64 = 32;
    let block = |i: u64| pattern(4096, 1000 + i);
    // Writes to distinct places, mixed with a flush and bad requests, in
    // one write(2).
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend(request_bytes(0, CMD_WRITE, i, i * 16384, 4096, &block(i)));
    }
    batch.extend(request_bytes(0, CMD_FLUSH, 500, 0, 0, &[]));
    batch.extend(request_bytes(0, CMD_READ, 501, SIZE, 512, &[]));
    batch.extend(request_bytes(0, 42, 502, 0, 0, &[]));
    c.send(&batch);
    let mut errors = std::collections::BTreeMap::new();
    for _ in 0..N + 3 {
        let (e, cookie) = c.simple();
        assert!(errors.insert(cookie, e).is_none(), "cookie {cookie} twice");
    }
    let mut want: std::collections::BTreeMap<u64, u32> = (0..N).map(|i| (i, 0)).collect();
    want.extend([(500, 0), (501, EINVAL), (502, EINVAL)]);
    assert_eq!(errors, want);

    // Reads of all of it, then a disconnect, in one write(2): every read
    // is answered before the server closes.
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend(request_bytes(0, CMD_READ, 1000 + i, i * 16384, 4096, &[]));
    }
    batch.extend(request_bytes(0, CMD_DISC, 9999, 0, 0, &[]));
    c.send(&batch);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..N {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0, "cookie {cookie}");
        let i = cookie - 1000;
        assert!(i < N && seen.insert(i), "cookie {cookie}");
        assert_eq!(c.read_data(4096), block(i), "data of cookie {cookie}");
    }
    assert!(c.wait_closed().is_empty(), "no reply to NBD_CMD_DISC");
    good_client_works(&s, 0x17);
    finish(s);
}

// ---------------------------------------------------------------------------
// Extended headers and structured replies

/// Negotiate structured replies (or extended headers) and base:allocation;
/// returns the client and the context id.
fn negotiate_structured(s: &Server, extended: bool) -> (RawClient, u32) {
    let mut c = RawClient::connect(&s.socket);
    if extended {
        c.expect_opt(OPT_EXTENDED_HEADERS, &[], REP_ACK);
        c.expect_opt(OPT_STRUCTURED_REPLY, &[], REP_ERR_EXT_HEADER_REQD);
    } else {
        c.expect_opt(OPT_STRUCTURED_REPLY, &[], REP_ACK);
    }
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_request("", &["base:allocation"]),
    );
    let r = c.opt_replies();
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (r[0].typ, &r[0].data[4..]),
        (REP_META_CONTEXT, &b"base:allocation"[..])
    );
    let id = u32::from_be_bytes(r[0].data[..4].try_into().unwrap());
    assert_eq!(r[1].typ, REP_ACK);
    let f = c.go();
    assert_eq!(f.size, SIZE);
    assert_ne!(
        f.flags & TF_SEND_DF,
        0,
        "DF is offered with structured replies"
    );
    (c, id)
}

/// Read the chunks of one read reply and rebuild the data it describes.
fn read_chunks(c: &mut RawClient, cookie: u64, offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
    let mut data = vec![0xeeu8; len];
    let mut covered = vec![false; len];
    let mut types = Vec::new();
    loop {
        let ch = c.chunk();
        assert_eq!(ch.cookie, cookie, "{ch:?}");
        types.push(ch.typ);
        let off = u64::from_be_bytes(ch.data[..8].try_into().unwrap());
        let (start, piece) = match ch.typ {
            REPLY_TYPE_OFFSET_DATA => (off, ch.data[8..].to_vec()),
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(ch.data.len(), 12, "hole chunk payload");
                let n = u32::from_be_bytes(ch.data[8..12].try_into().unwrap());
                assert!(n > 0, "empty hole");
                (off, vec![0u8; n as usize])
            }
            t => panic!("unexpected chunk type {t}: {ch:?}"),
        };
        assert!(start >= offset, "chunk before the request");
        let at = (start - offset) as usize;
        assert!(at + piece.len() <= len, "chunk beyond the request");
        for (i, b) in piece.into_iter().enumerate() {
            assert!(!covered[at + i], "overlapping chunks");
            covered[at + i] = true;
            data[at + i] = b;
        }
        if ch.done() {
            break;
        }
    }
    assert!(covered.iter().all(|&c| c), "read reply leaves gaps");
    (data, types)
}

#[test]
fn extended_headers_carry_64_bit_requests_and_replies() {
    let s = server();
    let (mut c, id) = negotiate_structured(&s, true);
    // Writes, with and without NBD_CMD_FLAG_PAYLOAD_LEN: a NONE chunk.
    c.send(&ext_request_bytes(0, CMD_WRITE, 1, 4096, 8, b"extended"));
    let ch = c.chunk();
    assert!(ch.extended, "32-byte extended reply header");
    assert_eq!((ch.typ, ch.cookie, ch.done()), (REPLY_TYPE_NONE, 1, true));
    assert!(ch.data.is_empty());
    c.send(&ext_request_bytes(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE,
        2,
        8192,
        8,
        b"headers!",
    ));
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie), (REPLY_TYPE_NONE, 2));
    // Reads: one data chunk with the offset before the data.
    c.send(&ext_request_bytes(0, CMD_READ, 3, 4096, 8, &[]));
    let ch = c.chunk();
    assert!(ch.extended);
    assert_eq!(
        (ch.typ, ch.cookie, ch.done()),
        (REPLY_TYPE_OFFSET_DATA, 3, true)
    );
    assert_eq!(&ch.data[..8], &4096u64.to_be_bytes());
    assert_eq!(&ch.data[8..], b"extended");
    c.send(&ext_request_bytes(0, CMD_READ, 4, 8192, 8, &[]));
    assert_eq!(&c.chunk().data[8..], b"headers!");
    // Unwritten space is a hole chunk.
    c.send(&ext_request_bytes(
        0,
        CMD_READ,
        5,
        512 << 10,
        256 << 10,
        &[],
    ));
    let ch = c.chunk();
    assert_eq!(
        (ch.typ, ch.cookie, ch.done()),
        (REPLY_TYPE_OFFSET_HOLE, 5, true)
    );
    assert_eq!(&ch.data[..8], &(512u64 << 10).to_be_bytes());
    assert_eq!(&ch.data[8..], &(256u32 << 10).to_be_bytes());
    // 64-bit block status.
    c.send(&ext_request_bytes(0, CMD_BLOCK_STATUS, 6, 0, SIZE, &[]));
    let ch = c.chunk();
    assert_eq!(
        (ch.typ, ch.cookie, ch.done()),
        (REPLY_TYPE_BLOCK_STATUS_EXT, 6, true)
    );
    assert_eq!(u32::from_be_bytes(ch.data[..4].try_into().unwrap()), id);
    let n = u32::from_be_bytes(ch.data[4..8].try_into().unwrap()) as usize;
    assert!(n >= 1);
    assert_eq!(ch.data.len(), 8 + 16 * n);
    let ext: Vec<(u64, u64)> = ch.data[8..]
        .chunks(16)
        .map(|e| {
            (
                u64::from_be_bytes(e[..8].try_into().unwrap()),
                u64::from_be_bytes(e[8..].try_into().unwrap()),
            )
        })
        .collect();
    assert!(ext.iter().all(|e| e.0 > 0));
    assert!(ext.iter().map(|e| e.0).sum::<u64>() <= SIZE);
    assert!(
        ext[0].0 >= 12288 && ext[0].1 == 0,
        "written data first: {ext:?}"
    );
    // A 64-bit effect length beyond the end: an error chunk, not a close.
    c.send(&ext_request_bytes(0, CMD_TRIM, 7, 0, 1 << 40, &[]));
    expect_error_chunk(&mut c, 7, EINVAL, "trim of 1 TiB");
    c.send(&ext_request_bytes(0, CMD_READ, 8, 0, 1 << 33, &[]));
    expect_error_chunk(&mut c, 8, EINVAL, "read of 8 GiB");
    c.send(&ext_request_bytes(0, CMD_READ, 9, SIZE - 4, 8, &[]));
    expect_error_chunk(&mut c, 9, EINVAL, "read across the end");
    // A payload on a command that takes none is skipped, then refused.
    let fake = ext_request_bytes(0, CMD_WRITE, 0xdead, 0, 4, b"evil");
    c.send(&ext_request_bytes(
        CMD_FLAG_PAYLOAD_LEN,
        CMD_READ,
        10,
        0,
        fake.len() as u64,
        &fake,
    ));
    expect_error_chunk(&mut c, 10, EINVAL, "read with a payload");
    // An oversized write is refused and its payload skipped.
    let big: Vec<u8> = fake.iter().copied().cycle().take(33 << 20).collect();
    c.send(&ext_request_bytes(
        0,
        CMD_WRITE,
        11,
        0,
        big.len() as u64,
        &big,
    ));
    expect_error_chunk(&mut c, 11, EOVERFLOW, "33 MiB write");
    // Still going, and nothing was written by either.
    c.send(&ext_request_bytes(0, CMD_READ, 12, 0, 8, &[]));
    assert_eq!(c.chunk().typ, REPLY_TYPE_OFFSET_HOLE);
    c.send(&ext_request_bytes(0, CMD_READ, 13, 4096, 8, &[]));
    assert_eq!(&c.chunk().data[8..], b"extended");
    // A compact request after extended headers is garbage.
    c.request(0, CMD_READ, 14, 0, 512);
    let _ = c.s.write_all(&[0u8; 4]);
    assert!(c.wait_closed().is_empty());
    good_client_works(&s, 0x18);
    finish(s);
}

#[test]
fn export_name_after_extended_headers_closes() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    c.expect_opt(OPT_EXTENDED_HEADERS, &[], REP_ACK);
    c.option(OPT_EXPORT_NAME, b"");
    assert!(c.wait_closed().is_empty());
    assert_log(&s, "extended headers");
    finish(s);
}

#[test]
fn structured_replies_send_holes_data_and_block_status() {
    let s = server();
    let (mut c, id) = negotiate_structured(&s, false);
    // Unwritten: one hole chunk.
    c.request(0, CMD_READ, 1, 512 << 10, 256 << 10);
    let ch = c.chunk();
    assert!(!ch.extended, "compact structured header");
    assert_eq!(
        (ch.typ, ch.cookie, ch.done()),
        (REPLY_TYPE_OFFSET_HOLE, 1, true)
    );
    assert_eq!(&ch.data[..8], &(512u64 << 10).to_be_bytes());
    assert_eq!(&ch.data[8..], &(256u32 << 10).to_be_bytes());
    // Partly written: data and hole chunks that rebuild the contents.
    let data = pattern(4096, 7);
    c.write(2, 0, &data);
    expect_ok(&mut c, 2);
    c.request(0, CMD_READ, 3, 0, 256 << 10);
    let (got, types) = read_chunks(&mut c, 3, 0, 256 << 10);
    assert_eq!(&got[..4096], &data[..]);
    assert!(got[4096..].iter().all(|&b| b == 0));
    assert!(types.contains(&REPLY_TYPE_OFFSET_HOLE), "{types:?}");
    // With DF: a single data chunk.
    c.request(CMD_FLAG_DF, CMD_READ, 4, 0, 256 << 10);
    let (got2, types) = read_chunks(&mut c, 4, 0, 256 << 10);
    assert_eq!(types, vec![REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(got2, got);
    // Block status of base:allocation.
    c.request(0, CMD_BLOCK_STATUS, 5, 0, SIZE as u32);
    let ch = c.chunk();
    assert_eq!(
        (ch.typ, ch.cookie, ch.done()),
        (REPLY_TYPE_BLOCK_STATUS, 5, true)
    );
    assert_eq!(u32::from_be_bytes(ch.data[..4].try_into().unwrap()), id);
    assert_eq!((ch.data.len() - 4) % 8, 0);
    let ext: Vec<(u32, u32)> = ch.data[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert!(!ext.is_empty());
    assert!(ext.iter().all(|e| e.0 > 0));
    assert!(ext.iter().map(|e| u64::from(e.0)).sum::<u64>() <= SIZE);
    assert!(ext[0].0 >= 4096 && ext[0].1 == 0, "data first: {ext:?}");
    assert!(ext[1..].iter().all(|e| e.1 == 3), "then holes: {ext:?}");
    // REQ_ONE: exactly one extent, within the request.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 6, 128 << 10, 8192);
    let ch = c.chunk();
    assert_eq!(ch.data.len(), 4 + 8, "{ch:?}");
    assert_eq!(&ch.data[4..], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
    // Errors are error chunks.
    c.request(0, CMD_READ, 7, SIZE - 4, 8);
    expect_error_chunk(&mut c, 7, EINVAL, "read across the end");
    c.request(0, 42, 8, 0, 0);
    expect_error_chunk(&mut c, 8, EINVAL, "unknown command");
    c.request(0, CMD_BLOCK_STATUS, 9, SIZE, 512);
    expect_error_chunk(&mut c, 9, EINVAL, "block status at the end");
    c.request(0, CMD_FLUSH, 10, 0, 0);
    expect_ok(&mut c, 10);
    good_client_works(&s, 0x19);
    finish(s);
}

// ---------------------------------------------------------------------------
// Isolation

#[test]
fn stuck_and_malformed_clients_do_not_disturb_others() {
    let s = server();
    // Clients stuck in every awkward place.
    let silent = RawClient::connect_only(&s.socket);
    let mut half_option = RawClient::connect(&s.socket);
    half_option.send(&option_bytes(OPT_GO, &info_request("", &[]))[..10]);
    let mut half_payload = RawClient::connect(&s.socket);
    half_payload.send(&option_bytes(OPT_GO, &vec![0; 60_000])[..30_000]);
    let mut skipping = RawClient::connect(&s.socket);
    skipping.send(&option_bytes(OPT_GO, &vec![0; 1 << 20])[..100_000]);
    let mut half_request = transmitting(&s);
    half_request.send(&request_bytes(0, CMD_READ, 1, 0, 512, &[])[..20]);
    let mut half_write = transmitting(&s);
    half_write.send(&request_bytes(0, CMD_WRITE, 2, 0, 65536, &[0x77; 65536])[..40_000]);
    let mut never_reads = transmitting(&s);
    // Asks for 16 MiB of replies and reads none of them.
    let mut reads = Vec::new();
    for i in 0..16u64 {
        reads.extend(request_bytes(0, CMD_READ, i, 0, 1 << 20, &[]));
    }
    never_reads.send(&reads);
    let mut garbage = RawClient::connect(&s.socket);
    garbage.send(&[0xff; 64]);

    // Others are served meanwhile, by real clients and raw ones.
    good_client_works(&s, 0x21);
    let mut raw = transmitting(&s);
    assert_eq!(raw.read_ok(1, 512 << 10, 4), vec![0x21; 4]);
    let out = export_size(&s.uri());
    assert_eq!(out.trim(), SIZE.to_string());
    assert!(garbage.wait_closed().is_empty());

    // The transmission-phase ones are kept as long as they like (no
    // timeout after the handshake)...
    std::thread::sleep(Duration::from_millis(2500));
    assert!(half_request.is_open(Duration::from_millis(100)));
    assert!(half_write.is_open(Duration::from_millis(100)));
    // ...and can still finish what they started.
    half_write.send(&request_bytes(0, CMD_WRITE, 2, 0, 65536, &[0x77; 65536])[40_000..]);
    expect_ok(&mut half_write, 2);
    half_request.send(&request_bytes(0, CMD_READ, 1, 0, 512, &[])[20..]);
    assert_eq!(half_request.simple(), (0, 1));
    assert_eq!(half_request.read_data(512), vec![0x77; 512]);

    // Then everyone hangs up at once, mid-whatever.
    drop((silent, half_option, half_payload, skipping));
    drop((half_request, half_write, never_reads, garbage));
    good_client_works(&s, 0x22);
    assert_eq!(raw.read_ok(2, 512 << 10, 4), vec![0x22; 4]);
    finish(s);
}

#[test]
fn a_client_that_vanishes_mid_request_harms_nobody() {
    let s = server();
    for _ in 0..20 {
        let mut c = transmitting(&s);
        c.send(&request_bytes(0, CMD_WRITE, 1, 0, 8192, &[1; 8192])[..5000]);
        drop(c);
        let mut c = RawClient::connect(&s.socket);
        c.send(&option_bytes(OPT_LIST, &[])[..7]);
        drop(c);
        let mut c = transmitting(&s);
        c.request(0, CMD_READ, 1, 0, 1 << 20);
        drop(c);
    }
    let mut c = transmitting(&s);
    let mut buf = [0u8; 1];
    c.request(0, CMD_READ, 1, 0, 1);
    assert_eq!(c.simple(), (0, 1));
    c.s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0], "the torn write never happened");
    good_client_works(&s, 0x23);
    finish(s);
}

// ---------------------------------------------------------------------------
// Flow control and the old way in

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    let s = server();
    for no_zeroes in [true, false] {
        let mut c = RawClient::greeted(&s.socket);
        assert_ne!(c.server_flags & FLAG_NO_ZEROES, 0, "NO_ZEROES offered");
        let flags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
        c.send(&flags.to_be_bytes());
        c.expect_opt(99, &[], REP_ERR_UNSUP);
        c.option(OPT_EXPORT_NAME, b"");
        let h = c.read_exact(10);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), SIZE);
        assert_ne!(
            u16::from_be_bytes(h[8..].try_into().unwrap()) & TF_HAS_FLAGS,
            0
        );
        if !no_zeroes {
            assert_eq!(c.read_exact(124), vec![0u8; 124]);
        }
        c.write(1, 0, b"oldway");
        expect_ok(&mut c, 1);
        assert_eq!(c.read_ok(2, 0, 6), b"oldway");
    }
    finish(s);
}

#[test]
fn deep_pipelines_and_unread_replies_are_flow_controlled() {
    let s = server();
    let mut c = transmitting(&s);
    let want = pattern(SIZE as usize / 2, 3);
    c.write(1, 0, &want);
    expect_ok(&mut c, 1);
    // Far more requests than the server keeps in flight, in one write(2).
    const N: u64 = 3000;
    let mut batch = Vec::new();
    for i in 0..N {
        batch.extend(request_bytes(0, CMD_READ, i, (i % 1024) * 512, 512, &[]));
    }
    c.send(&batch);
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        let off = ((cookie % 1024) * 512) as usize;
        assert_eq!(c.read_data(512), want[off..off + 512], "cookie {cookie}");
    }
    // More reply bytes (96 MiB) than the server queues, requested before
    // the client reads any of them.
    let mut batch = Vec::new();
    for i in 0..96u64 {
        batch.extend(request_bytes(0, CMD_READ, 10_000 + i, 0, 1 << 20, &[]));
    }
    c.send(&batch);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..96 {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0, "cookie {cookie}");
        let d = c.read_data(1 << 20);
        assert_eq!(&d[..1 << 19], &want[..]);
    }
    // A client that half-closes after its last request still gets the
    // replies.
    for i in 0..8u64 {
        c.request(0, CMD_READ, 20_000 + i, i * 4096, 4096);
    }
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    for _ in 0..8 {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        let off = ((cookie - 20_000) * 4096) as usize;
        assert_eq!(c.read_data(4096), want[off..off + 4096]);
    }
    assert!(c.wait_closed().is_empty());
    finish(s);
}

#[test]
fn a_write_payload_too_large_to_skip_closes_the_connection() {
    let s = server();
    let (mut c, _) = negotiate_structured(&s, true);
    c.send(&ext_request_bytes(
        0,
        CMD_WRITE,
        1,
        0,
        (1 << 32) + 1,
        &[0; 4096],
    ));
    assert!(c.wait_closed().is_empty());
    assert_log(&s, "too large");
    good_client_works(&s, 0x24);
    finish(s);
}

#[test]
fn a_read_only_export_refuses_writes_with_eperm() {
    let s = Server::start(&["--handshake-timeout", "2", "-r", "memory", "1M"]);
    let mut c = RawClient::connect(&s.socket);
    let f = c.go();
    assert_ne!(f.flags & TF_READ_ONLY, 0);
    c.write(1, 0, &[0xaa; 4096]);
    expect_simple_error(&mut c, 1, EPERM, "write");
    c.request(0, CMD_TRIM, 2, 0, 4096);
    expect_simple_error(&mut c, 2, EPERM, "trim");
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    expect_simple_error(&mut c, 3, EPERM, "write zeroes");
    assert_eq!(c.read_ok(4, 0, 4096), vec![0u8; 4096], "payload skipped");
    finish(s);
}

#[test]
fn fua_and_other_write_flags_follow_what_was_advertised() {
    let s = server();
    let mut c = RawClient::connect(&s.socket);
    let f = c.go();
    let can = |bit: u16| f.flags & bit != 0;
    let expect = |c: &mut RawClient, cookie: u64, advertised: bool, what: &str| {
        if advertised {
            expect_ok(c, cookie);
        } else {
            expect_simple_error(c, cookie, EINVAL, what);
        }
    };
    c.send(&request_bytes(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 4, b"fua!"));
    expect(&mut c, 1, can(TF_SEND_FUA), "FUA write");
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 8192, 4096);
    expect(&mut c, 2, can(TF_SEND_WRITE_ZEROES), "zero, no hole");
    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 3, 8192, 4096);
    match c.simple() {
        (0, 3) => assert!(can(TF_SEND_FAST_ZERO)),
        (e, 3) if !can(TF_SEND_FAST_ZERO) => assert_eq!(e, EINVAL),
        // Advertised, the plugin may still say it is not fast.
        (e, 3) => assert_eq!(e, 95, "fast zero may only fail with ENOTSUP"),
        r => panic!("{r:?}"),
    }
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE, 4, 0, 0);
    expect_simple_error(&mut c, 4, EINVAL, "NO_HOLE on a write");
    c.request(0, CMD_CACHE, 5, SIZE - 512, 1024);
    expect_simple_error(&mut c, 5, EINVAL, "cache across the end");
    c.request(0, CMD_WRITE_ZEROES, 6, SIZE - 512, 1024);
    expect_simple_error(&mut c, 6, ENOSPC, "zero across the end");
    finish(s);
}

#[test]
fn a_client_that_never_reads_does_not_block_shutdown() {
    let s = server();
    let mut c = transmitting(&s);
    let mut reads = Vec::new();
    for i in 0..8u64 {
        reads.extend(request_bytes(0, CMD_READ, i, 0, 1 << 20, &[]));
    }
    c.send(&reads);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    // nbdhost(1): on SIGTERM it lets replies go out, closes the plugin and
    // exits 0. Replies nobody reads cannot go out; that must not hold the
    // server (or the plugin's close) hostage.
    let (st, log) = s.stop_with_log();
    let took = t.elapsed();
    assert!(
        st.success() && took < Duration::from_secs(10) && log.contains("replies unread"),
        "exit {st} after {took:?}:\n{log}"
    );
    drop(c);
}

#[test]
fn a_client_that_sends_one_byte_at_a_time_is_understood() {
    let s = server();
    let mut c = RawClient::greeted(&s.socket);
    let dribble = |c: &mut RawClient, bytes: &[u8]| {
        for b in bytes {
            c.send(&[*b]);
            std::thread::sleep(Duration::from_micros(300));
        }
    };
    dribble(
        &mut c,
        &(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes(),
    );
    dribble(&mut c, &option_bytes(99, b"xyz"));
    assert_eq!(c.opt_reply().typ, REP_ERR_UNSUP);
    dribble(
        &mut c,
        &option_bytes(OPT_GO, &info_request("", &[INFO_NAME])),
    );
    let r = c.opt_replies();
    assert_eq!(r.last().unwrap().typ, REP_ACK, "{r:?}");
    dribble(&mut c, &request_bytes(0, CMD_WRITE, 1, 100, 6, b"slowly"));
    expect_ok(&mut c, 1);
    dribble(&mut c, &request_bytes(0, CMD_READ, 2, 98, 10, &[]));
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_data(10), b"\0\0slowly\0\0");
    finish(s);
}

#[test]
fn structured_and_extended_reads_rebuild_sparse_data_exactly() {
    let s = server();
    let mut model = vec![0u8; SIZE as usize];
    let (mut c, _) = negotiate_structured(&s, false);
    // Small islands of data at odd places in a sea of zeroes.
    let rnd = pattern(64, 99);
    for i in 0..16usize {
        let off =
            (usize::from(rnd[i]) * 4099 + usize::from(rnd[i + 16]) * 13) % (SIZE as usize - 600);
        let len = 1 + usize::from(rnd[i + 32]) * 2;
        let data = pattern(len, i as u64 + 500);
        model[off..off + len].copy_from_slice(&data);
        c.write(i as u64, off as u64, &data);
        expect_ok(&mut c, i as u64);
    }
    model[SIZE as usize - 1] = 0xff;
    c.write(99, SIZE - 1, &[0xff]);
    expect_ok(&mut c, 99);
    let reads: [(u64, usize); 6] = [
        (0, SIZE as usize),
        (1, SIZE as usize - 1),
        (4095, 300_001),
        (65_537, 131_071),
        (SIZE - 200_000, 200_000),
        (777, 1),
    ];
    for (k, (off, len)) in reads.into_iter().enumerate() {
        let cookie = 1000 + k as u64;
        c.request(0, CMD_READ, cookie, off, len as u32);
        let (got, _) = read_chunks(&mut c, cookie, off, len);
        assert!(
            got == model[off as usize..off as usize + len],
            "compact read of {len} at {off} differs"
        );
    }
    // The same through extended headers, on a second connection.
    let (mut e, _) = negotiate_structured(&s, true);
    for (k, (off, len)) in reads.into_iter().enumerate() {
        let cookie = 2000 + k as u64;
        e.send(&ext_request_bytes(
            0,
            CMD_READ,
            cookie,
            off,
            len as u64,
            &[],
        ));
        let (got, _) = read_chunks(&mut e, cookie, off, len);
        assert!(
            got == model[off as usize..off as usize + len],
            "extended read of {len} at {off} differs"
        );
    }
    finish(s);
}
