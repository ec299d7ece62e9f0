//! The handshake: newstyle option haggling and the oldstyle greeting, as a
//! state machine over byte buffers.
//!
//! The machine never calls the layer chain. When it needs the export list
//! or an opened export it returns [`Event::Query`]; the session hands the
//! query to whoever drives it and feeds the result back with
//! [`Handshake::answer`].

use bytes::{Buf, BufMut, BytesMut};

use super::export::{ExportEntry, ExportInfo};
use super::wire::*;

/// Longest option payload we accept; anything longer is refused with
/// `NBD_REP_ERR_TOO_BIG` and skipped without being buffered.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or metadata query, as in the protocol.
pub const MAX_NAME_LEN: usize = 4096;

/// An export's description if it fits in an NBD string; one that does
/// not is left out, as nbdkit leaves it out (a client such as libnbd
/// rejects the whole reply otherwise).
fn fitting(description: Option<&str>) -> Option<&str> {
    description.filter(|d| d.len() <= MAX_NAME_LEN)
}

/// Options a client may send before the handshake ends, as nbdkit's
/// `MAX_NR_OPTIONS`: real clients send a handful (qemu four or five).
const DEFAULT_MAX_OPTIONS: u32 = 32;

/// The metadata context id of `base:allocation`.
pub const CONTEXT_BASE_ALLOCATION: u32 = 1;
const BASE_ALLOCATION: &str = "base:allocation";

/// Server-side settings that shape negotiation.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// `-o`: send the oldstyle greeting and no options.
    pub oldstyle: bool,
    /// `--mask-handshake`: global flags we are allowed to offer.
    pub handshake_mask: u16,
    /// `--no-sr`: refuse structured replies and extended headers.
    pub no_structured: bool,
    /// `--tls`: whether STARTTLS is offered, and whether it is required.
    pub tls: TlsMode,
    /// Options a client may send in one handshake, STARTTLS and what came
    /// before it included; every export of the longest `NBD_OPT_LIST`
    /// answered earns the client as many again. One more closes the
    /// connection.
    pub max_options: u32,
}

impl Default for HandshakeConfig {
    /// The command line's defaults: both handshake flags offered, no TLS.
    fn default() -> Self {
        HandshakeConfig {
            oldstyle: false,
            handshake_mask: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            no_structured: false,
            tls: TlsMode::Off,
            max_options: DEFAULT_MAX_OPTIONS,
        }
    }
}

/// The server's TLS policy (`--tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused.
    #[default]
    Off,
    /// TLS offered; plain clients are served too.
    On,
    /// Nothing but STARTTLS and ABORT is answered before TLS.
    Require,
}

/// What the backend is asked on the handshake's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Call `preconnect`; an error refuses the client.
    Preconnect,
    /// List the exports.
    List,
    /// Open `name` ("" is the default export) and describe it; keep the
    /// handle for transmission only if `keep`.
    Open { name: String, keep: bool },
}

/// Why the layers refused a [`Query`]: the errno chooses the option
/// reply an open gets (`EPERM`/`EACCES` a policy error, `ESHUTDOWN` a
/// shutdown error), and the message is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: i32,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of a [`Query`].
#[derive(Debug)]
pub enum Answer {
    Preconnect(Result<(), Refusal>),
    List(Result<Vec<ExportEntry>, Refusal>),
    Open(Result<ExportInfo, Refusal>),
    /// The export asked for needs TLS, which the client has not started
    /// (selective TLS: `NBD_REP_ERR_TLS_REQD`).
    TlsRequired,
}

/// Settled at the end of negotiation.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub style: ReplyStyle,
    pub base_allocation: bool,
    pub export: ExportInfo,
}

/// What the connection must do next.
#[derive(Debug)]
pub enum Event {
    /// Wait for more input (after writing any output).
    NeedInput,
    /// Run this query and call [`Handshake::answer`].
    Query(Query),
    /// Negotiation is over; enter transmission (after writing output).
    Done(Negotiated),
    /// STARTTLS was accepted: write the output in clear, then run the TLS
    /// handshake; every later byte is inside TLS. Call
    /// [`Handshake::tls_established`] when it completes.
    StartTls,
    /// The client ended negotiation with `NBD_OPT_ABORT`; close after
    /// writing output.
    Aborted,
    /// Close the connection after writing output; the reason is logged.
    Close(String),
}

#[derive(Debug)]
enum State {
    Start,
    Preconnecting,
    ClientFlags,
    Options,
    /// Skipping the payload of an option we refused as too big.
    Discarding(u64),
    Waiting(Pending),
    Finished,
}

#[derive(Debug)]
enum Pending {
    ExportName,
    List,
    Info {
        /// `Info` or `Go`.
        option: Opt,
        name: String,
        wants_name: bool,
    },
    Oldstyle,
}

/// The handshake state machine of one connection.
#[derive(Debug)]
pub struct Handshake {
    cfg: HandshakeConfig,
    state: State,
    /// The client set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    fixed: bool,
    no_zeroes: bool,
    style: ReplyStyle,
    /// Export for which `base:allocation` was selected, if it was.
    meta_export: Option<String>,
    options_seen: u32,
    /// Exports in the longest list sent in answer to `NBD_OPT_LIST`.
    listed: u32,
    tls_active: bool,
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// Reads a length-prefixed string from an option payload.
fn get_name(b: &mut &[u8]) -> Option<String> {
    if b.remaining() < 4 {
        return None;
    }
    let len = b.get_u32() as usize;
    if len > MAX_NAME_LEN || len > b.remaining() {
        return None;
    }
    let s = String::from_utf8(b[..len].to_vec()).ok()?;
    b.advance(len);
    Some(s)
}

impl Handshake {
    /// A machine for a new connection.
    pub fn new(cfg: HandshakeConfig) -> Self {
        Handshake {
            cfg,
            state: State::Start,
            fixed: false,
            no_zeroes: false,
            style: ReplyStyle::Simple,
            meta_export: None,
            options_seen: 0,
            listed: 0,
            tls_active: false,
        }
    }

    /// The TLS handshake that STARTTLS began has completed.
    pub fn tls_established(&mut self) {
        self.tls_active = true;
    }

    /// Advance as far as the buffered input allows, consuming what is used
    /// from `input` and appending to `out`.
    #[must_use]
    pub fn receive(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Event {
        loop {
            match &mut self.state {
                State::Start => {
                    self.state = State::Preconnecting;
                    return Event::Query(Query::Preconnect);
                }
                State::Preconnecting | State::Waiting(_) | State::Finished => {
                    return Event::NeedInput
                }
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Event::NeedInput;
                    }
                    let flags = input.get_u32();
                    // The client flags mirror the server's bit for bit,
                    // and the protocol says to drop a client that sets one
                    // the server did not offer.
                    let offered = u32::from(self.offered());
                    if flags & !offered != 0 {
                        return Event::Close(format!(
                            "client sent unknown handshake flags 0x{flags:x} (only 0x{offered:x} were offered)"
                        ));
                    }
                    self.fixed = flags & CLIENT_FIXED_NEWSTYLE != 0;
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Discarding(left) => {
                    let n = (*left).min(input.len() as u64);
                    input.advance(n as usize);
                    *left -= n;
                    if *left > 0 {
                        return Event::NeedInput;
                    }
                    self.state = State::Options;
                }
                State::Options => {
                    let hdr = match peek_option_header(input) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Event::NeedInput,
                        Err(e) => return Event::Close(format!("client option: {e}")),
                    };
                    self.options_seen += 1;
                    let bound = self.options_bound();
                    if self.options_seen > bound {
                        return Event::Close(format!(
                            "client sent more than {bound} options without finishing the handshake"
                        ));
                    }
                    if hdr.length > MAX_OPTION_LEN {
                        input.advance(OPTION_HEADER_LEN);
                        if Opt::from_wire(hdr.option) == Some(Opt::ExportName) {
                            return Event::Close(format!(
                                "export name of {} bytes is too long",
                                hdr.length
                            ));
                        }
                        put_option_reply(out, hdr.option, OptReply::ErrTooBig, b"option too long");
                        self.state = State::Discarding(u64::from(hdr.length));
                        continue;
                    }
                    let total = OPTION_HEADER_LEN + hdr.length as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Event::NeedInput;
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let data = input.split_to(hdr.length as usize);
                    if let Some(ev) = self.option(hdr.option, &data, out) {
                        return ev;
                    }
                }
            }
        }
    }

    /// Options this client may send: the configured bound, and as many
    /// again for each export listed to it, so that a client can walk a
    /// long list (`nbdinfo --list` asks `NBD_OPT_INFO` and
    /// `NBD_OPT_LIST_META_CONTEXT` of every export), as nbdkit allows.
    /// Listing again earns nothing more.
    fn options_bound(&self) -> u32 {
        self.cfg
            .max_options
            .saturating_mul(self.listed.saturating_add(1))
    }

    fn offered(&self) -> u16 {
        (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) & self.cfg.handshake_mask
    }

    fn structured(&self) -> bool {
        self.style != ReplyStyle::Simple
    }

    /// Handle one whole option, `number` as the client sent it; `Some`
    /// when the connection must act.
    fn option(&mut self, number: u32, data: &[u8], out: &mut Vec<u8>) -> Option<Event> {
        // Every reply echoes the number sent, known or not.
        let reply = |out: &mut Vec<u8>, typ: OptReply, msg: &str| {
            put_option_reply(out, number, typ, msg.as_bytes())
        };
        let option = Opt::from_wire(number);
        if !self.fixed && !matches!(option, Some(Opt::ExportName | Opt::Abort)) {
            // Without fixed newstyle NBD_OPT_EXPORT_NAME is the only valid
            // option (ABORT ends the session either way), and the server
            // must act as one without TLS: no STARTTLS, and never
            // NBD_REP_ERR_TLS_REQD. nbdkit answers NBD_REP_ERR_INVALID too.
            reply(
                out,
                OptReply::ErrInvalid,
                "the client did not set NBD_FLAG_C_FIXED_NEWSTYLE: only NBD_OPT_EXPORT_NAME is valid",
            );
            return None;
        }
        let tls_required = self.cfg.tls == TlsMode::Require && !self.tls_active;
        if tls_required && !matches!(option, Some(Opt::StartTls | Opt::Abort)) {
            // Nothing about the exports may leak before TLS.
            if option == Some(Opt::ExportName) {
                return Some(Event::Close(
                    "client asked for an export before STARTTLS, which is required".into(),
                ));
            }
            reply(
                out,
                OptReply::ErrTlsReqd,
                "TLS is required: use STARTTLS first",
            );
            return None;
        }
        let Some(option) = option else {
            reply(out, OptReply::ErrUnsup, "unknown option");
            return None;
        };
        match option {
            Opt::ExportName => {
                if self.style == ReplyStyle::Extended {
                    return Some(Event::Close(
                        "client used NBD_OPT_EXPORT_NAME after extended headers".into(),
                    ));
                }
                let Ok(name) = String::from_utf8(data.to_vec()) else {
                    return Some(Event::Close("export name is not UTF-8".into()));
                };
                if name.len() > MAX_NAME_LEN {
                    return Some(Event::Close("export name too long".into()));
                }
                self.state = State::Waiting(Pending::ExportName);
                Some(Event::Query(Query::Open { name, keep: true }))
            }
            Opt::Abort => {
                reply(out, OptReply::Ack, "");
                Some(Event::Aborted)
            }
            Opt::List => {
                if !data.is_empty() {
                    reply(out, OptReply::ErrInvalid, "NBD_OPT_LIST takes no data");
                    return None;
                }
                self.state = State::Waiting(Pending::List);
                Some(Event::Query(Query::List))
            }
            Opt::StartTls => {
                if self.cfg.tls == TlsMode::Off {
                    reply(
                        out,
                        OptReply::ErrPolicy,
                        "TLS is not enabled on this server",
                    );
                } else if !data.is_empty() {
                    reply(out, OptReply::ErrInvalid, "NBD_OPT_STARTTLS takes no data");
                } else if self.tls_active {
                    reply(out, OptReply::ErrInvalid, "TLS is already active");
                } else {
                    reply(out, OptReply::Ack, "");
                    // Nothing negotiated in clear survives into TLS.
                    self.style = ReplyStyle::Simple;
                    self.meta_export = None;
                    return Some(Event::StartTls);
                }
                None
            }
            Opt::Info | Opt::Go => {
                let mut b = data;
                let Some(name) = get_name(&mut b) else {
                    reply(out, OptReply::ErrInvalid, "malformed export name");
                    return None;
                };
                if b.remaining() < 2 {
                    reply(
                        out,
                        OptReply::ErrInvalid,
                        "missing information request count",
                    );
                    return None;
                }
                let n = b.get_u16() as usize;
                if b.remaining() != 2 * n {
                    reply(
                        out,
                        OptReply::ErrInvalid,
                        "information request count does not match length",
                    );
                    return None;
                }
                let wants_name =
                    (0..n).any(|_| InfoType::from_wire(b.get_u16()) == Some(InfoType::Name));
                self.state = State::Waiting(Pending::Info {
                    option,
                    name: name.clone(),
                    wants_name,
                });
                Some(Event::Query(Query::Open {
                    name,
                    keep: option == Opt::Go,
                }))
            }
            Opt::StructuredReply | Opt::ExtendedHeaders => {
                let extended = option == Opt::ExtendedHeaders;
                if !data.is_empty() {
                    reply(out, OptReply::ErrInvalid, "option takes no data");
                } else if self.cfg.no_structured {
                    reply(out, OptReply::ErrUnsup, "structured replies are disabled");
                } else if self.style == ReplyStyle::Extended && !extended {
                    reply(
                        out,
                        OptReply::ErrExtHeaderReqd,
                        "extended headers already negotiated",
                    );
                } else {
                    reply(out, OptReply::Ack, "");
                    self.style = if extended {
                        ReplyStyle::Extended
                    } else {
                        ReplyStyle::Structured
                    };
                }
                None
            }
            Opt::ListMetaContext | Opt::SetMetaContext => {
                self.meta_context(option, data, out);
                None
            }
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(&mut self, option: Opt, data: &[u8], out: &mut Vec<u8>) {
        let set = option == Opt::SetMetaContext;
        let invalid = |out: &mut Vec<u8>, msg: &str| {
            put_option_reply(out, option.wire(), OptReply::ErrInvalid, msg.as_bytes())
        };
        if set && !self.structured() {
            invalid(out, "structured replies must be negotiated first");
            return;
        }
        let mut b = data;
        let Some(export) = get_name(&mut b) else {
            invalid(out, "malformed export name");
            return;
        };
        if b.remaining() < 4 {
            invalid(out, "missing query count");
            return;
        }
        let n = b.get_u32();
        let mut queries = Vec::new();
        for _ in 0..n {
            let Some(q) = get_name(&mut b) else {
                invalid(out, "malformed query");
                return;
            };
            queries.push(q);
        }
        if b.has_remaining() {
            invalid(out, "trailing data after queries");
            return;
        }
        let matches = if queries.is_empty() {
            !set
        } else {
            queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
        };
        if matches {
            let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            d.put_u32(CONTEXT_BASE_ALLOCATION);
            d.put_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(out, option.wire(), OptReply::MetaContext, &d);
        }
        if set {
            self.meta_export = matches.then_some(export);
        }
        put_option_reply(out, option.wire(), OptReply::Ack, &[]);
    }

    /// Feed the result of the last [`Event::Query`].
    #[must_use]
    pub fn answer(&mut self, answer: Answer, out: &mut Vec<u8>) -> Event {
        let state = std::mem::replace(&mut self.state, State::Options);
        match (state, answer) {
            (State::Preconnecting, Answer::Preconnect(r)) => {
                if let Err(e) = r {
                    return Event::Close(format!("preconnect refused the client: {e}"));
                }
                if self.cfg.oldstyle && self.cfg.tls == TlsMode::Require {
                    // The oldstyle greeting carries the size and has no
                    // STARTTLS: nothing may be sent.
                    return Event::Close(
                        "TLS is required but the oldstyle handshake cannot start it".into(),
                    );
                }
                if self.cfg.oldstyle {
                    self.state = State::Waiting(Pending::Oldstyle);
                    return Event::Query(Query::Open {
                        name: String::new(),
                        keep: true,
                    });
                }
                put_newstyle_greeting(out, self.offered());
                self.state = State::ClientFlags;
                Event::NeedInput
            }
            (State::Waiting(Pending::List), Answer::List(r)) => {
                match r {
                    Ok(list) => {
                        let n = u32::try_from(list.len()).unwrap_or(u32::MAX);
                        self.listed = self.listed.max(n);
                        for e in list {
                            let mut d = Vec::new();
                            put_name(&mut d, &e.name);
                            if let Some(desc) = fitting(e.description.as_deref()) {
                                d.put_slice(desc.as_bytes());
                            }
                            put_option_reply(out, Opt::List.wire(), OptReply::Server, &d);
                        }
                        put_option_reply(out, Opt::List.wire(), OptReply::Ack, &[]);
                    }
                    Err(e) => put_option_reply(
                        out,
                        Opt::List.wire(),
                        OptReply::ErrPlatform,
                        e.message.as_bytes(),
                    ),
                }
                Event::NeedInput
            }
            (State::Waiting(Pending::Oldstyle), Answer::Open(r)) => match r {
                Ok(export) => {
                    put_oldstyle_greeting(out, export.size, export.transmission_flags(false));
                    self.finish(export)
                }
                Err(e) => Event::Close(format!("cannot open the export: {e}")),
            },
            (State::Waiting(Pending::ExportName), Answer::Open(r)) => match r {
                Ok(export) => {
                    out.put_u64(export.size);
                    out.put_u16(export.transmission_flags(self.structured()));
                    if !self.no_zeroes {
                        out.put_bytes(0, 124);
                    }
                    self.finish(export)
                }
                Err(e) => Event::Close(format!("cannot open export: {e}")),
            },
            (State::Waiting(Pending::Info { option, .. }), Answer::TlsRequired) => {
                put_option_reply(
                    out,
                    option.wire(),
                    OptReply::ErrTlsReqd,
                    b"this export requires TLS: use STARTTLS first",
                );
                Event::NeedInput
            }
            (State::Waiting(Pending::ExportName | Pending::Oldstyle), Answer::TlsRequired) => {
                Event::Close("the export requires TLS, which this client did not start".into())
            }
            (
                State::Waiting(Pending::Info {
                    option,
                    name,
                    wants_name,
                }),
                Answer::Open(r),
            ) => match r {
                Ok(export) => {
                    self.put_info(option, &name, wants_name, &export, out);
                    if option == Opt::Go {
                        if self.meta_export.as_deref() != Some(name.as_str()) {
                            self.meta_export = None;
                        }
                        self.finish(export)
                    } else {
                        Event::NeedInput
                    }
                }
                Err(Refusal { errno, message }) => {
                    let typ = match errno {
                        libc::EPERM | libc::EACCES => OptReply::ErrPolicy,
                        libc::ESHUTDOWN => OptReply::ErrShutdown,
                        _ => OptReply::ErrUnknown,
                    };
                    put_option_reply(out, option.wire(), typ, message.as_bytes());
                    Event::NeedInput
                }
            },
            (state, answer) => {
                self.state = state;
                Event::Close(format!("internal error: unexpected answer {answer:?}"))
            }
        }
    }

    fn put_info(
        &self,
        option: Opt,
        name: &str,
        wants_name: bool,
        e: &ExportInfo,
        out: &mut Vec<u8>,
    ) {
        let mut d = Vec::with_capacity(12);
        d.put_u16(InfoType::Export.wire());
        d.put_u64(e.size);
        d.put_u16(e.transmission_flags(self.structured()));
        put_option_reply(out, option.wire(), OptReply::Info, &d);
        if wants_name {
            let mut d = Vec::new();
            d.put_u16(InfoType::Name.wire());
            d.put_slice(if name.is_empty() {
                e.name.as_bytes()
            } else {
                name.as_bytes()
            });
            put_option_reply(out, option.wire(), OptReply::Info, &d);
        }
        if let Some(desc) = fitting(e.description.as_deref()) {
            let mut d = Vec::new();
            d.put_u16(InfoType::Description.wire());
            d.put_slice(desc.as_bytes());
            put_option_reply(out, option.wire(), OptReply::Info, &d);
        }
        let mut d = Vec::with_capacity(14);
        d.put_u16(InfoType::BlockSize.wire());
        d.put_u32(e.min_block);
        d.put_u32(e.preferred_block);
        d.put_u32(e.max_block);
        put_option_reply(out, option.wire(), OptReply::Info, &d);
        put_option_reply(out, option.wire(), OptReply::Ack, &[]);
    }

    fn finish(&mut self, export: ExportInfo) -> Event {
        self.state = State::Finished;
        Event::Done(Negotiated {
            style: self.style,
            base_allocation: self.meta_export.is_some(),
            export,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::export::test_export;

    fn cfg() -> HandshakeConfig {
        HandshakeConfig {
            handshake_mask: 3,
            ..Default::default()
        }
    }

    /// Append an option: an [`Opt`], or any number as a `u32`.
    fn option(out: &mut BytesMut, opt: impl Into<u32>, data: &[u8]) {
        OptionHeader {
            option: opt.into(),
            length: data.len() as u32,
        }
        .put(out);
        out.put_slice(data);
    }

    /// Read option replies: (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, OptReply, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 20 {
            assert_eq!(b.get_u64(), REPLY_MAGIC_OPT);
            let (o, t, l) = (b.get_u32(), b.get_u32(), b.get_u32() as usize);
            let t = OptReply::from_wire(t).unwrap_or_else(|| panic!("reply type 0x{t:x}"));
            v.push((o, t, b[..l].to_vec()));
            b.advance(l);
        }
        v
    }

    fn started() -> (Handshake, Vec<u8>) {
        let mut h = Handshake::new(cfg());
        let mut out = Vec::new();
        assert!(matches!(
            h.receive(&mut BytesMut::new(), &mut out),
            Event::Query(Query::Preconnect)
        ));
        assert!(matches!(
            h.answer(Answer::Preconnect(Ok(())), &mut out),
            Event::NeedInput
        ));
        assert_eq!(out.len(), 18);
        out.clear();
        (h, out)
    }

    #[test]
    fn go_with_structured_and_meta_context() {
        let (mut h, mut out) = started();
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        option(&mut input, Opt::StructuredReply, &[]);
        let mut meta = Vec::new();
        put_name(&mut meta, "");
        meta.put_u32(1);
        put_name(&mut meta, "base:allocation");
        option(&mut input, Opt::SetMetaContext, &meta);
        let mut go = Vec::new();
        put_name(&mut go, "");
        go.put_u16(1);
        go.put_u16(InfoType::Name.wire());
        option(&mut input, Opt::Go, &go);
        let ev = h.receive(&mut input, &mut out);
        assert!(matches!(ev, Event::Query(Query::Open { keep: true, .. })));
        let ev = h.answer(Answer::Open(Ok(test_export(1 << 20))), &mut out);
        let Event::Done(n) = ev else { panic!("{ev:?}") };
        assert_eq!(n.style, ReplyStyle::Structured);
        assert!(n.base_allocation);
        let r = replies(&out);
        let types: Vec<OptReply> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            vec![
                OptReply::Ack,
                OptReply::MetaContext,
                OptReply::Ack,
                OptReply::Info,
                OptReply::Info,
                OptReply::Info,
                OptReply::Ack
            ]
        );
        assert!(input.is_empty());
    }

    #[test]
    fn unknown_and_oversized_options_are_refused_without_buffering() {
        let (mut h, mut out) = started();
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, 99u32, b"xyz");
        input.put_u64(IHAVEOPT);
        input.put_u32(Opt::Go.wire());
        input.put_u32(MAX_OPTION_LEN + 1);
        input.put_bytes(0, 1000);
        assert!(matches!(h.receive(&mut input, &mut out), Event::NeedInput));
        assert!(
            input.is_empty(),
            "the oversized payload is consumed as it arrives"
        );
        let r = replies(&out);
        assert_eq!(r[0].1, OptReply::ErrUnsup);
        assert_eq!(r[1].1, OptReply::ErrTooBig);
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let (mut h, mut out) = started();
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        let mut meta = Vec::new();
        put_name(&mut meta, "");
        meta.put_u32(0);
        option(&mut input, Opt::SetMetaContext, &meta);
        let _ = h.receive(&mut input, &mut out);
        assert_eq!(replies(&out)[0].1, OptReply::ErrInvalid);
    }

    #[test]
    fn bad_option_magic_closes() {
        let (mut h, mut out) = started();
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        input.put_bytes(0xaa, 16);
        assert!(matches!(h.receive(&mut input, &mut out), Event::Close(_)));
    }

    fn started_with(tls: TlsMode) -> (Handshake, Vec<u8>) {
        let mut h = Handshake::new(HandshakeConfig { tls, ..cfg() });
        let mut out = Vec::new();
        let _ = h.receive(&mut BytesMut::new(), &mut out);
        let _ = h.answer(Answer::Preconnect(Ok(())), &mut out);
        out.clear();
        (h, out)
    }

    #[test]
    fn a_tls_only_export_of_an_optional_tls_server_asks_for_tls() {
        let (mut h, mut out) = started_with(TlsMode::On);
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        let mut go = Vec::new();
        put_name(&mut go, "secret");
        go.put_u16(0);
        option(&mut input, Opt::Go, &go);
        assert!(matches!(
            h.receive(&mut input, &mut out),
            Event::Query(Query::Open { .. })
        ));
        assert!(matches!(
            h.answer(Answer::TlsRequired, &mut out),
            Event::NeedInput
        ));
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (Opt::Go.wire(), OptReply::ErrTlsReqd));
    }

    #[test]
    fn tls_required_answers_only_starttls_and_abort() {
        let (mut h, mut out) = started_with(TlsMode::Require);
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, Opt::List, &[]);
        let mut go = Vec::new();
        put_name(&mut go, "");
        go.put_u16(0);
        option(&mut input, Opt::Go, &go);
        option(&mut input, Opt::StructuredReply, &[]);
        option(&mut input, Opt::StartTls, &[]);
        assert!(matches!(h.receive(&mut input, &mut out), Event::StartTls));
        let r = replies(&out);
        let types: Vec<OptReply> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            vec![
                OptReply::ErrTlsReqd,
                OptReply::ErrTlsReqd,
                OptReply::ErrTlsReqd,
                OptReply::Ack
            ]
        );
        out.clear();
        h.tls_established();
        option(&mut input, Opt::StartTls, &[]);
        option(&mut input, Opt::List, &[]);
        assert!(matches!(
            h.receive(&mut input, &mut out),
            Event::Query(Query::List)
        ));
        assert_eq!(
            replies(&out)[0].1,
            OptReply::ErrInvalid,
            "STARTTLS inside TLS is refused"
        );
    }

    #[test]
    fn export_name_before_required_tls_closes() {
        let (mut h, mut out) = started_with(TlsMode::Require);
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, Opt::ExportName, b"");
        assert!(matches!(h.receive(&mut input, &mut out), Event::Close(_)));
        assert!(out.is_empty(), "nothing leaks in clear");
    }

    #[test]
    fn starttls_resets_structured_replies_and_tls_on_serves_plain() {
        let (mut h, mut out) = started_with(TlsMode::On);
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, Opt::StructuredReply, &[]);
        option(&mut input, Opt::StartTls, &[]);
        assert!(matches!(h.receive(&mut input, &mut out), Event::StartTls));
        h.tls_established();
        let mut go = Vec::new();
        put_name(&mut go, "");
        go.put_u16(0);
        option(&mut input, Opt::Go, &go);
        let _ = h.receive(&mut input, &mut out);
        let Event::Done(n) = h.answer(Answer::Open(Ok(test_export(512))), &mut out) else {
            panic!()
        };
        assert_eq!(n.style, ReplyStyle::Simple);

        let (mut plain, mut out) = started_with(TlsMode::On);
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, Opt::List, &[]);
        assert!(matches!(
            plain.receive(&mut input, &mut out),
            Event::Query(Query::List)
        ));
    }

    #[test]
    fn oldstyle_with_tls_required_sends_nothing() {
        let mut h = Handshake::new(HandshakeConfig {
            oldstyle: true,
            tls: TlsMode::Require,
            ..cfg()
        });
        let mut out = Vec::new();
        let _ = h.receive(&mut BytesMut::new(), &mut out);
        let ev = h.answer(Answer::Preconnect(Ok(())), &mut out);
        assert!(matches!(ev, Event::Close(_)), "{ev:?}");
        assert!(out.is_empty(), "no size or greeting in clear");
    }

    #[test]
    fn export_name_answers_with_size_and_flags() {
        let (mut h, mut out) = started();
        let mut input = BytesMut::new();
        input.put_u32(CLIENT_FIXED_NEWSTYLE);
        option(&mut input, Opt::ExportName, b"disk");
        let ev = h.receive(&mut input, &mut out);
        let Event::Query(Query::Open { name, keep: true }) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(name, "disk");
        assert!(matches!(
            h.answer(Answer::Open(Ok(test_export(512))), &mut out),
            Event::Done(_)
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..8], &512u64.to_be_bytes());
    }

    /// A machine past the greeting whose client sent `flags`.
    fn negotiating(cfg: HandshakeConfig, flags: u32) -> (Handshake, Vec<u8>) {
        let mut h = Handshake::new(cfg);
        let mut out = Vec::new();
        let _ = h.receive(&mut BytesMut::new(), &mut out);
        let _ = h.answer(Answer::Preconnect(Ok(())), &mut out);
        out.clear();
        let mut input = BytesMut::new();
        input.put_u32(flags);
        assert!(matches!(h.receive(&mut input, &mut out), Event::NeedInput));
        (h, out)
    }

    /// Send `n` options the server does not know; the event after them.
    fn unknown_options(h: &mut Handshake, n: usize, out: &mut Vec<u8>) -> Event {
        let mut input = BytesMut::new();
        for _ in 0..n {
            option(&mut input, 99u32, &[]);
        }
        h.receive(&mut input, out)
    }

    #[test]
    fn one_option_beyond_the_bound_closes_the_connection() {
        let cfg = HandshakeConfig {
            max_options: 4,
            ..cfg()
        };
        let (mut h, mut out) = negotiating(cfg, CLIENT_FIXED_NEWSTYLE);
        assert!(matches!(
            unknown_options(&mut h, 4, &mut out),
            Event::NeedInput
        ));
        assert_eq!(
            replies(&out).len(),
            4,
            "every option within the bound is answered"
        );
        out.clear();
        let ev = unknown_options(&mut h, 1, &mut out);
        let Event::Close(why) = ev else {
            panic!("{ev:?}")
        };
        assert!(why.contains("more than 4 options"), "{why}");
        assert!(
            out.is_empty(),
            "the option beyond the bound is not answered"
        );
    }

    #[test]
    fn options_before_starttls_count_against_the_same_bound() {
        let cfg = HandshakeConfig {
            max_options: 3,
            tls: TlsMode::On,
            ..cfg()
        };
        let (mut h, mut out) = negotiating(cfg, CLIENT_FIXED_NEWSTYLE);
        assert!(matches!(
            unknown_options(&mut h, 1, &mut out),
            Event::NeedInput
        ));
        let mut input = BytesMut::new();
        option(&mut input, Opt::StartTls, &[]);
        assert!(matches!(h.receive(&mut input, &mut out), Event::StartTls));
        h.tls_established();
        assert!(matches!(
            unknown_options(&mut h, 1, &mut out),
            Event::NeedInput
        ));
        assert!(matches!(
            unknown_options(&mut h, 1, &mut out),
            Event::Close(_)
        ));
    }

    #[test]
    fn every_listed_export_earns_the_bound_again() {
        let cfg = HandshakeConfig {
            max_options: 2,
            ..cfg()
        };
        let (mut h, mut out) = negotiating(cfg, CLIENT_FIXED_NEWSTYLE);
        let list = || {
            ["a", "b", "c"]
                .map(|name| ExportEntry {
                    name: name.into(),
                    description: None,
                })
                .to_vec()
        };
        let mut input = BytesMut::new();
        option(&mut input, Opt::List, &[]);
        assert!(matches!(
            h.receive(&mut input, &mut out),
            Event::Query(Query::List)
        ));
        assert!(matches!(
            h.answer(Answer::List(Ok(list())), &mut out),
            Event::NeedInput
        ));
        // Listing again earns nothing more.
        option(&mut input, Opt::List, &[]);
        let _ = h.receive(&mut input, &mut out);
        let _ = h.answer(Answer::List(Ok(list())), &mut out);
        // 2 * (1 + 3) options in all, two of them the lists.
        assert!(matches!(
            unknown_options(&mut h, 6, &mut out),
            Event::NeedInput
        ));
        assert!(matches!(
            unknown_options(&mut h, 1, &mut out),
            Event::Close(_)
        ));
    }

    #[test]
    fn starttls_from_a_client_without_fixed_newstyle_is_invalid() {
        let cfg = HandshakeConfig {
            tls: TlsMode::Require,
            ..cfg()
        };
        let (mut h, mut out) = negotiating(cfg, CLIENT_NO_ZEROES);
        let mut input = BytesMut::new();
        option(&mut input, Opt::StartTls, &[]);
        // Not NBD_REP_ERR_TLS_REQD either: without fixed newstyle the
        // server must act as one without TLS.
        option(&mut input, Opt::List, &[]);
        assert!(matches!(h.receive(&mut input, &mut out), Event::NeedInput));
        let r = replies(&out);
        assert_eq!(
            r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            [
                (Opt::StartTls.wire(), OptReply::ErrInvalid),
                (Opt::List.wire(), OptReply::ErrInvalid)
            ]
        );
    }

    #[test]
    fn a_client_without_fixed_newstyle_is_served_by_export_name() {
        let (mut h, mut out) = negotiating(cfg(), 0);
        let mut input = BytesMut::new();
        option(&mut input, Opt::ExportName, b"disk");
        assert!(matches!(
            h.receive(&mut input, &mut out),
            Event::Query(Query::Open { keep: true, .. })
        ));
        assert!(matches!(
            h.answer(Answer::Open(Ok(test_export(512))), &mut out),
            Event::Done(_)
        ));
        assert_eq!(out.len(), 8 + 2 + 124, "zeroes, as NO_ZEROES was not set");
    }

    #[test]
    fn client_flags_the_server_did_not_offer_close_the_connection() {
        let only_fixed = HandshakeConfig {
            handshake_mask: FLAG_FIXED_NEWSTYLE,
            ..cfg()
        };
        for (cfg, flags) in [
            (only_fixed, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES),
            (cfg(), CLIENT_FIXED_NEWSTYLE | 1 << 5),
        ] {
            let mut h = Handshake::new(cfg);
            let mut out = Vec::new();
            let _ = h.receive(&mut BytesMut::new(), &mut out);
            let _ = h.answer(Answer::Preconnect(Ok(())), &mut out);
            let mut input = BytesMut::new();
            input.put_u32(flags);
            let ev = h.receive(&mut input, &mut out);
            assert!(matches!(ev, Event::Close(_)), "flags 0x{flags:x}: {ev:?}");
        }
    }
}
