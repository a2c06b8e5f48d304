/**
 * realtime.js: a dependency-free browser client for the realtime WebSocket protocol (docs/protocol.md).
 *
 * Copy this one file next to your page and import it as an ES module. It keeps a socket open, resumes every
 * subscription after a disconnect from the last position it delivered, and tells you when it could not.
 *
 * Connection lifecycle (the `status` event reports each arrow once):
 *
 *     connect() ─► connecting ─open─► live ─close / no pong─► reconnecting ─backoff─► (open) ─► live
 *                      │                                        ▲      │
 *                      └──────────── socket failed ─────────────┘      └─ retries forever, delay capped
 *
 *     close(), or the browser reports it is offline ─► offline      ("online" event ─► reconnect at once)
 *
 * With a `getToken` option (a server with a token key), each attempt first asks for a token, and `open`
 * leads to `live` only through the server's answer to `auth`; subscriptions are sent after it:
 *
 *     (re)connect ─getToken()─► open ─auth─► authenticated ─► live ─at ~80% of the token's life─► getToken()
 *                                             │                 ▲          ─► auth on the same socket ─┘
 *                                             │                 └─ close 4001 "token expired" ─► reconnecting
 *       unauthorized / forbidden, or close 4001 "authentication required" ─► unauthorized (no more retries;
 *                                                                            connect() starts over)
 *
 * Subscription lifecycle, repeated on every connection:
 *
 *     sent ─► [snapshot chunks, assembled] ─► subscribed ─► change, change, ...
 *       ├─ with `since: lastSeq` once it has a position, so the server replays exactly what was missed
 *       ├─ error cursor_expired ─► `reset` handler ─► sent again with `snapshot: true`
 *       ├─ error unavailable ─► `retry` handler ─► retrying: sent again, the same way, after
 *       │                       max(retry_after_ms, backoff) plus jitter; the backoff grows while it repeats
 *       └─ any other error ─► `error` handler ─► failed (never retried)
 *
 * `LiveView` (at the end of this file) keeps one subscription's rows in a Map, from its snapshot and change frames,
 * applying whole transactions only:
 *
 *     snapshot ─► rows replaced ─► render      change {tx} … change {tx, tx_end} ─► all applied ─► ONE render
 *     reset (cursor_expired) ─► held frames dropped ─► the fresh snapshot replaces every row ─► render
 *
 * Positions (`seq`) are read as JavaScript numbers; they stay exact up to 2^53, far beyond any real changelog.
 */

/** @typedef {'connecting' | 'live' | 'reconnecting' | 'offline' | 'unauthorized'} Status */
/** @typedef {'INSERT' | 'UPDATE' | 'DELETE'} Op */
/** @typedef {'eq' | 'neq' | 'lt' | 'lte' | 'gt' | 'gte' | 'in' | 'is'} FilterOp */

/**
 * One filter condition; all conditions of a subscription must hold.
 * @typedef {object} Condition
 * @property {string} column
 * @property {FilterOp} op
 * @property {unknown} value  a scalar; a non-empty list for `in`; null, true or false for `is`
 */

/**
 * What to subscribe to.
 * @typedef {object} SubscribeSpec
 * @property {string} table            `users` or `schema.table`
 * @property {string} [id]             1–64 chars, unique on this client; generated when omitted
 * @property {Op[]} [events]           default: all three
 * @property {Condition[]} [filter]    default: every row
 * @property {boolean} [snapshot]      deliver the matching rows first, then the changes after them
 * @property {number} [since]          resume from a position you stored earlier (excludes `snapshot`)
 */

/**
 * A `change` frame exactly as the server sent it.
 * @typedef {object} ChangeFrame
 * @property {'change'} type
 * @property {string} id               the subscription id
 * @property {number} seq
 * @property {string} table
 * @property {Op | 'TRUNCATE'} op             what happened in the database
 * @property {'added' | 'modified' | 'removed' | 'reset'} view   what it does to this subscription's view: upsert
 *           `row` by `key` (added, modified), delete `key` (removed), empty the view (reset, a TRUNCATE)
 * @property {Record<string, unknown>} [key]   the row's primary key (absent for reset)
 * @property {Record<string, unknown>} [row]   present for added and modified
 * @property {Record<string, unknown>} [old]   present for modified and removed (under a policy, a row that left
 *           what the token may read has only its key here)
 * @property {string} ts                        commit time, ISO 8601 UTC
 * @property {string} [tx]                      the transaction's id; absent on changes recorded before the server
 *           stamped transactions (such a frame stands alone)
 * @property {true} [tx_end]                    on the subscription's last frame of the transaction: apply the
 *           frames held since the previous `tx_end` together, now
 */

/**
 * Callbacks of one subscription; all are optional.
 * @typedef {object} Handlers
 * @property {(rows: Record<string, unknown>[], seq: number) => void} [snapshot]
 *           the complete snapshot, every chunk assembled, read at position `seq`
 * @property {(seq: number) => void} [subscribed]   the subscription is live from `seq` (after each (re)connect)
 * @property {(frame: ChangeFrame) => void} [change] one committed change, never twice, in `seq` order
 * @property {() => void} [reset]
 *           the server no longer holds the changes since our last position; a fresh `snapshot` follows,
 *           so throw away what you derived from earlier frames
 * @property {(err: RealtimeError, delay: number) => void} [retry]
 *           the server cannot serve the subscription right now (`err.code` is `unavailable`, `err.retryAfter` its
 *           hint); it is asked again in `delay` ms, from the same position, and stays open meanwhile
 * @property {(err: RealtimeError) => void} [error]  the server refused the subscription; it is closed
 */

/**
 * Client options.
 * @typedef {object} ClientOptions
 * @property {number} [pingInterval]   ms between application pings (default 15000)
 * @property {number} [pongTimeout]    ms to wait for the pong before the link counts as dead (default 5000)
 * @property {number} [connectTimeout] ms an opening handshake may take before it is abandoned (default 10000)
 * @property {{initial?: number, max?: number}} [backoff]  reconnect delay bounds in ms (default 500 / 15000)
 * @property {typeof WebSocket} [WebSocket]  constructor to use instead of the global one (tests, Node)
 * @property {() => string | Promise<string>} [getToken]
 *           a bearer token (JWT) for a server with a token key: asked before every connection attempt and again
 *           before the token expires; leave it out for an open server
 */

/**
 * Who the server says the connection is, passed to `authenticated` listeners after every accepted `auth`
 * (the first of each connection and every refresh). All three are null on an open server.
 * @typedef {object} AuthInfo
 * @property {string | null} sub
 * @property {string | null} role
 * @property {number | null} exp    seconds since the epoch
 */

/**
 * Details of a lost connection, passed to `disconnect` listeners. Only sockets that had opened report one; a
 * failed attempt just leads to the next.
 * @typedef {object} DisconnectInfo
 * @property {number} code        WebSocket close code (4000 when this client gave up on a silent link)
 * @property {string} reason
 * @property {number | null} serverLastSeq  `last_seq` from a 1012 / 4008 / 4001 reason, for diagnostics only
 */

const DEFAULTS = {
  pingInterval: 15_000,
  pongTimeout: 5_000,
  connectTimeout: 10_000,
  backoff: { initial: 500, max: 15_000 },
};
const OPS = ['INSERT', 'UPDATE', 'DELETE'];
// Our own close code for a link that stopped answering (4000-4999 is free for applications).
const CLOSE_NO_ANSWER = 4000;
// 2 ** 30 times any sane initial delay already exceeds every sane cap; stop growing the exponent there.
const MAX_EXPONENT = 30;
// A server's `retry_after_ms` above this counts as this: a delay past 2^31 - 1 ms would make setTimeout fire at once.
const MAX_RETRY_AFTER = 300_000;
// The longest delay setTimeout honours; a token valid for longer is refreshed after this anyway.
const MAX_TIMER = 2 ** 31 - 1;
// A token is refreshed at this fraction of its remaining life, or this many ms before it expires if that is
// earlier; never sooner than the floor after the previous answer, whatever the token says.
const REFRESH_AT = 0.8;
const REFRESH_MARGIN = 30_000;
const REFRESH_FLOOR = 1_000;
// The server's close code for a missing or expired token; the reason tells which.
const CLOSE_UNAUTHENTICATED = 4001;

/** An `error` frame from the server, or a problem this client detected. */
export class RealtimeError extends Error {
  /**
   * @param {string} code     the protocol error code, e.g. `invalid_filter`
   * @param {string} message
   * @param {unknown} [ref]   the `ref` of the request it answers
   * @param {number | null} [retryAfter]  the server's `retry_after_ms` hint (sent with `unavailable`), else null
   */
  constructor(code, message, ref, retryAfter = null) {
    super(message);
    this.name = 'RealtimeError';
    this.code = code;
    this.ref = ref;
    this.retryAfter = retryAfter;
  }
}

/**
 * Turn a path such as `/ws` into an absolute ws:// or wss:// URL on the page's own origin.
 * @param {string} url
 * @param {string} [base]
 * @returns {string}
 */
export function resolveSocketUrl(url, base = globalThis.location?.href) {
  const resolved = new URL(url, base);
  if (resolved.protocol === 'http:') resolved.protocol = 'ws:';
  else if (resolved.protocol === 'https:') resolved.protocol = 'wss:';
  return resolved.href;
}

/**
 * A subscription as the caller sees it. It outlives connections: the client re-sends it after every reconnect.
 */
export class Subscription {
  #record;
  #detach;

  /** @param {SubRecord} record @param {() => void} detach */
  constructor(record, detach) {
    this.#record = record;
    this.#detach = detach;
  }

  /** @returns {string} the subscription id used on the wire */
  get id() {
    return this.#record.id;
  }

  /** @returns {number | null} the last position delivered to the handlers (null before the first one) */
  get seq() {
    return this.#record.lastSeq;
  }

  /** @returns {SubState} */
  get state() {
    return this.#record.phase;
  }

  /** Stop receiving frames. Safe to call more than once. */
  unsubscribe() {
    this.#detach();
  }
}

/**
 * `pending`: sent (or waiting for the connection), not answered yet. `live`: subscribed. `retrying`: refused as
 * `unavailable` and asked again after a delay, until that succeeds (a lost connection makes it `pending` again,
 * like every subscription). `closed`: unsubscribed. `failed`: refused for good.
 * @typedef {'pending' | 'live' | 'retrying' | 'closed' | 'failed'} SubState
 */

/**
 * @typedef {object} SubRecord
 * @property {string} id
 * @property {string} table
 * @property {Op[] | undefined} events
 * @property {Condition[] | undefined} filter
 * @property {Handlers} handlers
 * @property {number | null} lastSeq       highest seq delivered; the resume point
 * @property {boolean} needSnapshot        true until a complete snapshot has been delivered (if one is wanted)
 * @property {SubState} phase
 * @property {unknown} ref                  ref of the subscribe request in flight on this connection
 * @property {Record<string, unknown>[]} chunks  snapshot rows received so far on this connection
 * @property {number} refusals              `unavailable` answers in a row; sets how long the next retry waits
 * @property {ReturnType<typeof setTimeout> | null} retryTimer  the pending re-send after an `unavailable`
 */

export class RealtimeClient {
  #url;
  #options;
  #WebSocket;
  /** @type {WebSocket | null} */
  #ws = null;
  /** whether #ws got as far as `open` */
  #opened = false;
  /** @type {Status} */
  #status = 'offline';
  /** @type {Map<string, Set<Function>>} */
  #listeners = new Map();
  /** @type {Map<string, SubRecord>} active subscriptions by id */
  #subs = new Map();
  /** ids unsubscribed on this connection whose `unsubscribed` reply has not come back yet */
  #draining = new Set();
  /** @type {Map<unknown, {kind: 'auth' | 'subscribe' | 'unsubscribe' | 'ping', record?: SubRecord}>} */
  #pending = new Map();
  #nextRef = 1;
  #nextSubId = 1;
  #attempt = 0;
  #everLive = false;
  /** true between connect() and close(): the caller wants a connection */
  #wanted = false;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #retryTimer = null;
  /** @type {ReturnType<typeof setInterval> | null} */
  #pingTimer = null;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #pongTimer = null;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #connectTimer = null;
  /** @type {(() => string | Promise<string>) | null} */
  #getToken = null;
  /** true while a connection attempt waits for getToken, before its socket exists */
  #fetchingToken = false;
  /** true once requests may go out on #ws: it is open and, with getToken, authenticated */
  #ready = false;
  /** @type {number | null} `exp` of the token the connection holds (seconds since the epoch) */
  #exp = null;
  /** bumped whenever a socket or attempt ends, so a late getToken answer cannot touch the next one */
  #generation = 0;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #refreshTimer = null;

  /**
   * Create a client. Nothing happens until `connect()`.
   * @param {string} url  `ws://…`, `wss://…`, or a path such as `/ws` on the page's origin
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    this.#url = resolveSocketUrl(url);
    this.#options = {
      pingInterval: options.pingInterval ?? DEFAULTS.pingInterval,
      pongTimeout: options.pongTimeout ?? DEFAULTS.pongTimeout,
      connectTimeout: options.connectTimeout ?? DEFAULTS.connectTimeout,
      backoff: { ...DEFAULTS.backoff, ...options.backoff },
    };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#getToken = options.getToken ?? null;
  }

  /** @returns {Status} */
  get status() {
    return this.#status;
  }

  /**
   * Listen to client-level events. Returns a function that removes the listener.
   *   `status` (status: Status)          every change of connection state
   *   `disconnect` (info: DisconnectInfo) a socket closed (a reconnect follows unless offline)
   *   `error` (err: RealtimeError)        a problem not tied to one subscription's handlers
   *   `authenticated` (info: AuthInfo)     the server accepted a token (on connect and on each refresh)
   * @overload
   * @param {'status'} type
   * @param {(status: Status) => void} listener
   * @returns {() => void}
   */
  /**
   * @overload
   * @param {'disconnect'} type
   * @param {(info: DisconnectInfo) => void} listener
   * @returns {() => void}
   */
  /**
   * @overload
   * @param {'error'} type
   * @param {(err: RealtimeError) => void} listener
   * @returns {() => void}
   */
  /**
   * @overload
   * @param {'authenticated'} type
   * @param {(info: AuthInfo) => void} listener
   * @returns {() => void}
   */
  /**
   * @param {string} type
   * @param {Function} listener
   * @returns {() => void}
   */
  on(type, listener) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * Open the connection (idempotent). Subscriptions made before or after are sent once it is open.
   * @returns {this}
   */
  connect() {
    if (!this.#wanted) {
      this.#wanted = true;
      globalThis.addEventListener?.('online', this.#onOnline);
      globalThis.addEventListener?.('offline', this.#onOffline);
    }
    if (this.#ws || this.#retryTimer || this.#fetchingToken) return this;
    if (this.#browserOffline()) this.#setStatus('offline');
    else this.#open();
    return this;
  }

  /**
   * Close the connection and stop reconnecting; status becomes `offline`. Subscriptions are kept, with their
   * positions, so a later `connect()` resumes them without loss.
   */
  close() {
    this.#wanted = false;
    globalThis.removeEventListener?.('online', this.#onOnline);
    globalThis.removeEventListener?.('offline', this.#onOffline);
    this.#abandonSocket(1000, 'client closed');
    this.#setStatus('offline');
  }

  /**
   * Subscribe to changes of one table.
   * @param {SubscribeSpec} spec
   * @param {Handlers} [handlers]
   * @returns {Subscription}
   */
  subscribe(spec, handlers = {}) {
    if (!spec || typeof spec.table !== 'string' || spec.table === '') {
      throw new TypeError('subscribe: `table` is required');
    }
    if (spec.snapshot && spec.since != null) {
      throw new TypeError('subscribe: `since` and `snapshot` cannot be combined');
    }
    if (spec.events && (spec.events.length === 0 || spec.events.some((op) => !OPS.includes(op)))) {
      throw new TypeError(`subscribe: \`events\` must be a non-empty subset of ${OPS.join(', ')}`);
    }
    const id = spec.id ?? this.#generateId();
    if (this.#subs.has(id) || this.#draining.has(id)) {
      // A reused id would let frames of the old subscription, still in flight, land in the new one.
      throw new Error(`subscribe: id "${id}" is still in use on this client`);
    }
    /** @type {SubRecord} */
    const record = {
      id,
      table: spec.table,
      events: spec.events,
      filter: spec.filter,
      handlers,
      lastSeq: spec.since ?? null,
      needSnapshot: Boolean(spec.snapshot),
      phase: 'pending',
      ref: null,
      chunks: [],
      refusals: 0,
      retryTimer: null,
    };
    this.#subs.set(id, record);
    if (this.#ready) this.#sendSubscribe(record);
    return new Subscription(record, () => this.#unsubscribe(record));
  }

  // ── connection ─────────────────────────────────────────────────────────────────────────────────────────

  #open() {
    this.#setStatus(this.#everLive ? 'reconnecting' : 'connecting');
    if (!this.#getToken) {
      this.#openSocket(null);
      return;
    }
    // The token comes first, so the socket does not sit unauthenticated (and on the server's AUTH_TIMEOUT_S)
    // while an identity provider answers. connectTimeout covers both.
    const generation = ++this.#generation;
    this.#fetchingToken = true;
    this.#armConnectTimer();
    this.#askToken().then((answer) => {
      if (generation !== this.#generation) return; // given up on, closed or offline meanwhile
      this.#fetchingToken = false;
      if ('token' in answer) this.#openSocket(answer.token);
      else if (answer.err.code === 'unauthorized') this.#halt(answer.err);
      else {
        // getToken threw: its source may be down for a moment. Retry like a failed socket, with backoff.
        if (this.#connectTimer) clearTimeout(this.#connectTimer);
        this.#connectTimer = null;
        this.#emit('error', answer.err);
        this.#scheduleRetry();
      }
    });
  }

  /**
   * Open the socket; with a token, `auth` is its first frame and `live` waits for the answer.
   * @param {string | null} token
   */
  #openSocket(token) {
    let ws;
    try {
      ws = new this.#WebSocket(this.#url);
    } catch (cause) {
      // A malformed URL or a missing WebSocket throws here. Report it and keep retrying like any failure,
      // so the status stays truthful (never `live`) and a transient cause can still recover.
      if (this.#connectTimer) clearTimeout(this.#connectTimer);
      this.#connectTimer = null;
      this.#emit('error', new RealtimeError('connect_failed', String(cause)));
      this.#scheduleRetry();
      return;
    }
    this.#ws = ws;
    if (!this.#connectTimer) this.#armConnectTimer();
    // Handlers check `ws === this.#ws` so a socket we already gave up on can no longer touch our state.
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#opened = true;
      if (token == null) this.#goLive();
      // Nothing else is sent before the answer: the server refuses every other frame until then.
      else this.#send({ type: 'auth', token }, { kind: 'auth' });
    };
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#onMessage(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#lost(event.code, event.reason);
    };
    // An `error` event is always followed by `close`, which does the work.
    ws.onerror = null;
  }

  #armConnectTimer() {
    // A handshake into a black hole can hang for minutes before the browser gives up; we give up sooner.
    this.#connectTimer = setTimeout(() => {
      this.#connectTimer = null;
      this.#giveUp('connect timeout');
    }, this.#options.connectTimeout);
  }

  /** The socket is open (and, with a token, authenticated): requests may go out. */
  #goLive() {
    if (this.#connectTimer) clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#ready = true;
    this.#everLive = true;
    this.#setStatus('live');
    this.#startHeartbeat();
    for (const record of this.#subs.values()) this.#sendSubscribe(record);
  }

  /**
   * Ask the caller's getToken; never throws.
   * @returns {Promise<{token: string} | {err: RealtimeError}>}
   */
  async #askToken() {
    let token;
    try {
      token = await /** @type {() => string | Promise<string>} */ (this.#getToken)();
    } catch (cause) {
      const text = cause instanceof Error ? cause.message : String(cause);
      return { err: new RealtimeError('token_unavailable', `getToken failed: ${text}`) };
    }
    if (typeof token !== 'string' || token === '') {
      return { err: new RealtimeError('unauthorized', 'getToken returned no token') };
    }
    return { token };
  }

  /**
   * The server refused our identity, or we have none to offer: retrying would only be refused again. Stop,
   * keeping every subscription and its position, so that a later `connect()` (with a token that works) resumes.
   * @param {RealtimeError} err
   */
  #halt(err) {
    this.#wanted = false;
    globalThis.removeEventListener?.('online', this.#onOnline);
    globalThis.removeEventListener?.('offline', this.#onOffline);
    this.#abandonSocket(1000, 'unauthorized');
    this.#setStatus('unauthorized');
    this.#emit('error', err);
  }

  /**
   * Refresh at REFRESH_AT of the token's remaining life or REFRESH_MARGIN before exp, whichever is earlier.
   * @param {boolean} [stale]  the last refresh did not move exp on (getToken gave the same token back): ask again
   *                           after half the remaining life, so a token source that cannot do better is asked a
   *                           few times, not once a second, until the server closes the connection at exp
   */
  #scheduleRefresh(stale = false) {
    if (this.#refreshTimer) clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#getToken || this.#exp == null) return; // an open server: tokens do not expire there
    // Read against this browser's clock; the server's AUTH_LEEWAY_S absorbs a small skew.
    const remaining = this.#exp * 1000 - Date.now();
    const ahead = stale ? remaining / 2 : Math.min(remaining * REFRESH_AT, remaining - REFRESH_MARGIN);
    const delay = Math.min(MAX_TIMER, Math.max(REFRESH_FLOOR, ahead));
    this.#refreshTimer = setTimeout(() => {
      this.#refreshTimer = null;
      this.#refresh();
    }, delay);
  }

  /** Send a fresh token on the open connection: subscriptions carry on untouched. */
  async #refresh() {
    const generation = this.#generation;
    const answer = await this.#askToken();
    if (generation !== this.#generation || !this.#ready) return; // that connection is gone
    if ('token' in answer) {
      this.#send({ type: 'auth', token: answer.token }, { kind: 'auth' });
    } else if (answer.err.code === 'unauthorized') {
      this.#halt(answer.err);
    } else {
      // The token source failed for now; try again later (the floor keeps this from spinning). If exp comes
      // first, the server closes 4001 and the reconnect asks again.
      this.#emit('error', answer.err);
      this.#scheduleRefresh();
    }
  }

  /**
   * The socket is gone (closed by the server, the network, or us after a missing pong): resume later.
   * @param {number} code
   * @param {string} reason
   */
  #lost(code, reason) {
    const wasOpen = this.#opened;
    this.#dropSocketState();
    if (wasOpen) {
      const match = /last_seq=(\d+)/.exec(reason || '');
      this.#emit('disconnect', { code, reason, serverLastSeq: match ? Number(match[1]) : null });
    }
    // 4001 "token expired": a new connection with a fresh token resumes like any other loss. Any other 4001
    // ("authentication required") would be met the same way on every attempt.
    if (code === CLOSE_UNAUTHENTICATED && !/^token expired/.test(reason || '') && this.#wanted) {
      this.#halt(new RealtimeError('unauthorized', reason || 'authentication required'));
      return;
    }
    if (!this.#wanted || this.#browserOffline()) {
      this.#setStatus('offline');
      return;
    }
    // 1012 (server restarting) and 4008 (we read too slowly) need nothing special: every subscription
    // resumes from its own last seq, which is at least as precise as the server's `last_seq`.
    this.#setStatus(this.#everLive ? 'reconnecting' : 'connecting');
    this.#scheduleRetry();
  }

  /**
   * Full-jitter backoff: a uniform delay in [0, min(max, initial·2^attempt)) spreads a reconnect storm.
   * @param {number} [floor]  the least delay, e.g. the server's `retry_after_ms`
   */
  #scheduleRetry(floor = 0) {
    const { initial, max } = this.#options.backoff;
    const ceiling = Math.min(max, initial * 2 ** Math.min(this.#attempt, MAX_EXPONENT));
    this.#attempt += 1;
    const delay = Math.max(floor, Math.random() * ceiling);
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#open();
    }, delay);
  }

  /**
   * Stop using the current socket now, without waiting for a closing handshake a dead link would never finish.
   * @param {number} code
   * @param {string} reason
   */
  #abandonSocket(code, reason) {
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#closeQuietly(code, reason);
    this.#dropSocketState();
  }

  /**
   * The link did not answer in time: close it and go through the normal loss path (event, status, retry).
   * @param {string} reason
   */
  #giveUp(reason) {
    this.#closeQuietly(CLOSE_NO_ANSWER, reason);
    this.#lost(CLOSE_NO_ANSWER, reason);
  }

  /**
   * Close the socket with its handlers detached, so its late events cannot reach us.
   * @param {number} code  1000 or 3000-4999: browsers refuse any other code from a client
   * @param {string} reason
   */
  #closeQuietly(code, reason) {
    const ws = this.#ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      // Some engines throw when closing a socket that is still connecting; it is discarded either way.
    }
  }

  /** Forget everything that only made sense on the socket that just ended. */
  #dropSocketState() {
    this.#ws = null;
    this.#opened = false;
    this.#ready = false;
    this.#exp = null;
    this.#fetchingToken = false;
    this.#generation += 1;
    if (this.#pingTimer) clearInterval(this.#pingTimer);
    if (this.#pongTimer) clearTimeout(this.#pongTimer);
    if (this.#connectTimer) clearTimeout(this.#connectTimer);
    if (this.#refreshTimer) clearTimeout(this.#refreshTimer);
    this.#pingTimer = this.#pongTimer = this.#connectTimer = this.#refreshTimer = null;
    this.#pending.clear();
    this.#draining.clear();
    for (const record of this.#subs.values()) {
      // A half-received snapshot is useless: the next connection asks for a new one (lastSeq is still null).
      // A retry that was waiting is dropped too: the next connection sends every subscription at once.
      this.#cancelRetry(record);
      record.phase = 'pending';
      record.ref = null;
      record.chunks = [];
    }
  }

  #startHeartbeat() {
    const { pingInterval, pongTimeout } = this.#options;
    this.#pingTimer = setInterval(() => {
      if (this.#pongTimer) return; // the previous ping is still waiting; its timeout decides
      const ref = this.#send({ type: 'ping' }, { kind: 'ping' });
      if (ref == null) return;
      this.#pongTimer = setTimeout(() => {
        this.#pongTimer = null;
        // A half-open TCP link can stay "open" for minutes; no pong is the only reliable sign it is dead.
        this.#giveUp('no pong');
      }, pongTimeout);
    }, pingInterval);
  }

  #onOnline = () => {
    if (!this.#wanted || this.#ws || this.#fetchingToken) return;
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#attempt = 0; // the network just came back; waiting out an old backoff would only add delay
    this.#open();
  };

  #onOffline = () => {
    if (!this.#wanted) return;
    this.#abandonSocket(1000, 'browser offline');
    this.#setStatus('offline');
  };

  #browserOffline() {
    return globalThis.navigator?.onLine === false;
  }

  #isOpen() {
    return this.#ws !== null && this.#ws.readyState === 1; // WebSocket.OPEN, without needing the global
  }

  // ── frames out ─────────────────────────────────────────────────────────────────────────────────────────

  /**
   * Send one message with a fresh `ref`, remembering what it was for. Returns the ref, or null if not open.
   * @param {Record<string, unknown>} message
   * @param {{kind: 'auth' | 'subscribe' | 'unsubscribe' | 'ping', record?: SubRecord}} purpose
   */
  #send(message, purpose) {
    if (!this.#isOpen()) return null;
    const ref = this.#nextRef++;
    this.#pending.set(ref, purpose);
    /** @type {WebSocket} */ (this.#ws).send(JSON.stringify({ ...message, ref }));
    return ref;
  }

  /** @param {SubRecord} record */
  #sendSubscribe(record) {
    /** @type {Record<string, unknown>} */
    const message = { type: 'subscribe', id: record.id, table: record.table };
    if (record.events) message.events = record.events;
    if (record.filter) message.filter = record.filter;
    // Once we hold a position, `since` makes the server replay exactly the gap: nothing lost, nothing twice.
    if (record.lastSeq != null) message.since = record.lastSeq;
    else if (record.needSnapshot) message.snapshot = true;
    // A retry stays `retrying` until it is answered: the caller learns it is live from `subscribed`.
    if (record.phase !== 'retrying') record.phase = 'pending';
    record.chunks = [];
    record.ref = this.#send(message, { kind: 'subscribe', record });
  }

  /**
   * The server cannot serve this subscription right now (database or change stream away, history reads busy).
   * Ask again later, the same way: `since` once it holds a position, so nothing is lost or delivered twice.
   * The delay honours the server's hint, and is never shorter than this client's own backoff, which doubles
   * with each refusal in a row; up to half of it again is added at random so clients do not return together.
   * @param {SubRecord} record
   * @param {RealtimeError} err
   */
  #retryLater(record, err) {
    const { initial, max } = this.#options.backoff;
    const own = Math.min(max, initial * 2 ** Math.min(record.refusals, MAX_EXPONENT));
    record.refusals += 1;
    const base = Math.max(err.retryAfter ?? 0, own);
    const delay = base * (1 + Math.random() / 2);
    this.#cancelRetry(record);
    record.phase = 'retrying';
    record.ref = null;
    record.chunks = [];
    record.retryTimer = setTimeout(() => {
      record.retryTimer = null;
      // A lost connection cancels this timer; a new one sends every subscription itself.
      if (this.#subs.get(record.id) === record && this.#ready) this.#sendSubscribe(record);
    }, delay);
    call(record.handlers.retry, err, delay);
  }

  /** @param {SubRecord} record */
  #cancelRetry(record) {
    if (record.retryTimer) clearTimeout(record.retryTimer);
    record.retryTimer = null;
  }

  /** @param {SubRecord} record */
  #unsubscribe(record) {
    if (this.#subs.get(record.id) !== record) return;
    this.#subs.delete(record.id);
    // Waiting to retry: the server holds nothing for it (its last subscribe was refused), so there is nothing
    // to tell it.
    const waiting = record.retryTimer != null;
    this.#cancelRetry(record);
    record.phase = 'closed';
    // Not ready: nothing of it is on the server (subscribes go out only once the connection is ready).
    if (waiting || !this.#ready) return;
    if (this.#send({ type: 'unsubscribe', id: record.id }, { kind: 'unsubscribe', record }) != null) {
      this.#draining.add(record.id);
    }
  }

  #generateId() {
    let id;
    do id = `s${this.#nextSubId++}`;
    while (this.#subs.has(id) || this.#draining.has(id));
    return id;
  }

  // ── frames in ──────────────────────────────────────────────────────────────────────────────────────────

  /** @param {unknown} data */
  #onMessage(data) {
    let frame;
    try {
      frame = JSON.parse(/** @type {string} */ (data));
    } catch {
      this.#emit('error', new RealtimeError('bad_frame', 'the server sent a frame that is not JSON'));
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    // The server answered, so this connection works: the next failure starts again from the shortest delay.
    this.#attempt = 0;
    switch (frame.type) {
      case 'authenticated':
        return this.#onAuthenticated(frame);
      case 'snapshot':
        return this.#onSnapshot(frame);
      case 'subscribed':
        return this.#onSubscribed(frame);
      case 'change':
        return this.#onChange(frame);
      case 'unsubscribed':
        this.#pending.delete(frame.ref);
        this.#draining.delete(frame.id);
        return;
      case 'pong':
        if (this.#pending.get(frame.ref)?.kind === 'ping') {
          this.#pending.delete(frame.ref);
          if (this.#pongTimer) clearTimeout(this.#pongTimer);
          this.#pongTimer = null;
        }
        return;
      case 'error':
        return this.#onError(frame);
      default:
        // Unknown frame types are ignored so an older client keeps working against a newer server.
        return;
    }
  }

  /** @param {any} frame */
  #onAuthenticated(frame) {
    if (this.#pending.get(frame.ref)?.kind !== 'auth') return;
    this.#pending.delete(frame.ref);
    const previous = this.#exp; // null on a connection's first answer
    this.#exp = typeof frame.exp === 'number' ? frame.exp : null;
    if (!this.#ready) this.#goLive();
    this.#scheduleRefresh(previous != null && this.#exp != null && this.#exp <= previous);
    this.#emit('authenticated', { sub: frame.sub ?? null, role: frame.role ?? null, exp: this.#exp });
  }

  /**
   * The server did not accept our `auth` (on connect or on a refresh).
   * @param {RealtimeError} err
   */
  #onAuthRefused(err) {
    if (err.code !== 'unavailable' && err.code !== 'rate_limited') {
      // unauthorized (bad, expired or malformed token), forbidden (a token for another user), bad_message:
      // the same token source would be refused again.
      this.#halt(err);
      return;
    }
    // The server cannot check tokens right now (its JWKS is unreachable). Report it and try again later.
    this.#emit('error', err);
    if (this.#ready) {
      this.#scheduleRefresh(); // a refresh: the connection keeps its identity until exp
      return;
    }
    // A connection that never authenticated would be closed after AUTH_TIMEOUT_S: start a new one later.
    this.#closeQuietly(1000, 'authentication unavailable');
    this.#dropSocketState();
    this.#setStatus(this.#everLive ? 'reconnecting' : 'connecting');
    this.#scheduleRetry(err.retryAfter ?? 0);
  }

  /** @param {any} frame */
  #onSnapshot(frame) {
    const record = this.#subs.get(frame.id);
    // Snapshot chunks only come before `subscribed`, for the request in flight (pending, or a retry).
    if (!record || record.phase === 'live' || record.ref == null) return;
    for (const row of frame.rows ?? []) record.chunks.push(row);
    if (!frame.last) return;
    const rows = record.chunks;
    record.chunks = [];
    // Only a complete snapshot gives a resume point; a partial one is discarded on disconnect.
    record.lastSeq = frame.seq;
    record.needSnapshot = false;
    call(record.handlers.snapshot, rows, frame.seq);
  }

  /** @param {any} frame */
  #onSubscribed(frame) {
    this.#pending.delete(frame.ref);
    const record = this.#subs.get(frame.id);
    // Ignore a reply that answers an earlier subscribe of this id rather than the one in flight.
    if (!record || (frame.ref != null && record.ref !== frame.ref)) return;
    record.phase = 'live';
    record.refusals = 0;
    // Live from `seq` means nothing that matches lies between our position and it, so moving up is safe.
    if (typeof frame.seq === 'number' && (record.lastSeq == null || frame.seq > record.lastSeq)) {
      record.lastSeq = frame.seq;
    }
    call(record.handlers.subscribed, frame.seq);
  }

  /** @param {any} frame */
  #onChange(frame) {
    const record = this.#subs.get(frame.id);
    if (!record) return; // unsubscribed; the frame was already in flight
    // Safety net for the "never twice" promise, e.g. a replay overlapping what we already delivered.
    if (record.lastSeq != null && frame.seq <= record.lastSeq) return;
    record.lastSeq = frame.seq;
    call(record.handlers.change, frame);
  }

  /** @param {any} frame */
  #onError(frame) {
    const purpose = frame.ref != null ? this.#pending.get(frame.ref) : undefined;
    if (frame.ref != null) this.#pending.delete(frame.ref);
    const hint = frame.retry_after_ms;
    const retryAfter = Number.isFinite(hint) && hint >= 0 ? Math.min(hint, MAX_RETRY_AFTER) : null;
    const err = new RealtimeError(frame.code ?? 'unknown', frame.message ?? '', frame.ref, retryAfter);

    if (purpose?.kind === 'auth') {
      this.#onAuthRefused(err);
      return;
    }
    if (err.code === 'unauthorized') {
      // A request refused because the connection has no identity (a server with a token key, and no getToken
      // here): every subscription would meet the same answer. Stop instead of failing them one by one.
      this.#halt(err);
      return;
    }
    if (purpose?.kind === 'unsubscribe') {
      // not_subscribed: the server had already dropped it (its subscribe failed). Either way it is gone.
      this.#draining.delete(frame.id ?? purpose.record?.id);
      return;
    }
    const record = frame.id != null ? this.#subs.get(frame.id) : purpose?.record;
    const aboutCurrentAttempt = record && (frame.ref == null || record.ref === frame.ref);
    if (!record || !aboutCurrentAttempt) {
      this.#emit('error', err);
      return;
    }
    if (err.code === 'cursor_expired') {
      // The gap can no longer be replayed. Start over from a snapshot and say so, rather than skip silently.
      record.lastSeq = null;
      record.needSnapshot = true;
      call(record.handlers.reset);
      if (this.#subs.get(record.id) === record) this.#sendSubscribe(record);
      return;
    }
    if (err.code === 'unavailable' || err.code === 'rate_limited') {
      // Transient by definition: the subscription stays open and is asked for again, from where it was.
      this.#retryLater(record, err);
      return;
    }
    // Any other refusal (bad filter, unknown table, limits) will not fix itself on retry.
    this.#subs.delete(record.id);
    record.phase = 'failed';
    if (record.handlers.error) call(record.handlers.error, err);
    else this.#emit('error', err);
  }

  // ── events ─────────────────────────────────────────────────────────────────────────────────────────────

  /** @param {Status} status */
  #setStatus(status) {
    if (status === this.#status) return;
    this.#status = status;
    this.#emit('status', status);
  }

  /** @param {string} type @param {unknown} value */
  #emit(type, value) {
    for (const listener of this.#listeners.get(type) ?? []) call(listener, value);
  }
}

// ── views ──────────────────────────────────────────────────────────────────────────────────────────────────

/**
 * A row as the server sends it: the table's columns as PostgreSQL's `to_jsonb` renders them (under a row-level
 * policy, the columns the token may read).
 * @typedef {Record<string, unknown>} Row
 */

/**
 * What a view is made of: a subscription spec without `since` and `snapshot` (a view always starts from a
 * snapshot), and the table's primary key.
 * @typedef {object} ViewSpec
 * @property {string} table            `users` or `schema.table`
 * @property {string} [id]             1–64 chars, unique on the client; generated when omitted
 * @property {Op[]} [events]           default all three; a view equal to the query needs all three
 * @property {Condition[]} [filter]    default: every row
 * @property {string[]} [key]          the primary key's columns (default `['id']`): snapshot rows carry no key of
 *           their own, so the view must know which columns make it
 */

/**
 * What one change frame did to a view.
 * @typedef {object} ViewChange
 * @property {'added' | 'modified' | 'removed' | 'reset'} view   the frame's `view`
 * @property {string | null} key       where the row is held in `LiveView.rows` (null for reset)
 * @property {Row | null} row          the row now held under `key` (added, modified; null otherwise)
 * @property {Row | null} previous     the row held under `key` before the change (null if there was none)
 * @property {string | null} movedFrom an UPDATE of the primary key: the key the row was held under before, which
 *           the change deleted; null otherwise
 * @property {ChangeFrame} frame       the frame as the server sent it
 */

/**
 * One step of a view, passed to the `render` handler: a complete snapshot, or whole transactions.
 * @typedef {object} ViewUpdate
 * @property {'snapshot' | 'transaction'} cause
 * @property {number} seq              the position the rows are now current at
 * @property {string[]} transactions   the ids (`tx`) of the transactions applied, in order; empty for a snapshot
 *           and for a change recorded before the server stamped transactions
 * @property {ViewChange[]} changes    what each frame did, in `seq` order; empty for a snapshot
 * @property {ReadonlyMap<string, Row>} rows  the rows after this step (the view's own Map, `LiveView.rows`)
 */

/**
 * Callbacks of a view, all optional: the subscription's (see `Handlers`, called as for `subscribe`) and `render`.
 * `change` is called for each frame as it arrives, before it is applied; `render` once per snapshot and once per
 * whole transaction, after the rows hold it.
 * @typedef {Handlers & {render?: (update: ViewUpdate) => void}} ViewHandlers
 */

/**
 * The rows of one subscription, kept equal to `SELECT … WHERE filter` by the protocol's rules (docs/protocol.md,
 * "change"): the snapshot fills the view; `added` and `modified` upsert `row` under its key, `removed` deletes the
 * key, `reset` (a TRUNCATE) empties it. Rows are held in a `Map` under the JSON of their key object, with the
 * key's columns in the order of `spec.key`: `{"id":42}`, or `{"region":"eu","id":7}` for a composite key.
 *
 * Whole transactions only, so a page never shows half of one:
 *
 *     change {tx:"7"} ─► held     change {tx:"7"} ─► held     change {tx:"7", tx_end:true} ─► all three applied,
 *                                                                                            ONE render
 *     change without tx (recorded before the server stamped transactions) ─► applied at once, one render
 *
 * Transactions that commit side by side can interleave in the stream; the server then puts `tx_end` on the last
 * frame of the last of them, and they are applied together. Held frames survive a lost connection: the client
 * resumes with `since` its last position and the server replays the rest of the transaction. When the gap can no
 * longer be replayed (`cursor_expired`) the held frames are dropped, and the fresh snapshot replaces every row.
 */
export class LiveView {
  /** @type {Map<string, Row>} */
  #rows = new Map();
  /** @type {ChangeFrame[]} frames received since the last `tx_end`, not applied yet */
  #held = [];
  /** @type {number | null} */
  #seq = null;
  /** @type {string[]} */
  #columns;
  /** @type {string} */
  #table;
  /** @type {ViewHandlers} */
  #handlers;
  /** @type {Subscription} */
  #subscription;

  /**
   * Subscribe `client` to the view's rows (with a snapshot) and keep them here. Nothing arrives before
   * `client.connect()`.
   * @param {RealtimeClient} client
   * @param {ViewSpec} spec
   * @param {ViewHandlers} [handlers]
   */
  constructor(client, spec, handlers = {}) {
    const { key = ['id'], ...subscription } = /** @type {ViewSpec & {since?: unknown, snapshot?: unknown}} */ (spec ?? {});
    if (!Array.isArray(key) || key.length === 0 || key.some((column) => typeof column !== 'string' || column === '')) {
      throw new TypeError('LiveView: `key` must be a non-empty list of column names');
    }
    if (subscription.since != null || subscription.snapshot != null) {
      throw new TypeError('LiveView: a view always starts from a snapshot; leave out `since` and `snapshot`');
    }
    this.#columns = [...key];
    this.#table = String(subscription.table);
    this.#handlers = handlers;
    /** @type {Handlers} */
    const passed = {
      snapshot: (rows, seq) => this.#onSnapshot(rows, seq),
      subscribed: (seq) => this.#onSubscribed(seq),
      change: (frame) => this.#onChange(frame),
      reset: () => {
        // The gap is lost: what is held can no longer be completed. The rows stay until the fresh snapshot
        // replaces them all, so a page does not flash empty in between.
        this.#held = [];
        call(handlers.reset);
      },
      retry: (err, delay) => call(handlers.retry, err, delay),
    };
    // Only when given: without an `error` handler the client reports a refusal through its `error` event.
    if (handlers.error) passed.error = (err) => call(handlers.error, err);
    this.#subscription = client.subscribe({ ...subscription, snapshot: true }, passed);
  }

  /** @returns {ReadonlyMap<string, Row>} the rows by key, as of `seq` (read it; it changes only through frames) */
  get rows() {
    return this.#rows;
  }

  /** @returns {number | null} the position the rows are current at; null before the snapshot */
  get seq() {
    return this.#seq;
  }

  /** @returns {number} frames received but not applied yet: their transaction has not ended */
  get held() {
    return this.#held.length;
  }

  /** @returns {Subscription} the subscription under the view (`id`, `state`, `seq` of the last frame received) */
  get subscription() {
    return this.#subscription;
  }

  /**
   * The key under which a row is held: the JSON of its key columns, in `spec.key`'s order.
   * @param {Record<string, unknown>} source  a row, a change's `row` or `old`, or a `key` object
   * @returns {string}
   */
  keyOf(source) {
    /** @type {Record<string, unknown>} */
    const key = {};
    for (const column of this.#columns) {
      if (!source || typeof source !== 'object' || !(column in source)) {
        throw new TypeError(
          `LiveView ${this.#table}: a row without the key column "${column}"; the view's key is ` +
            `[${this.#columns.join(', ')}] (pass the table's primary key as \`key\`)`,
        );
      }
      key[column] = source[column];
    }
    return JSON.stringify(key);
  }

  /** Stop: unsubscribe and forget what is held. The rows stay as they were. */
  close() {
    this.#held = [];
    this.#subscription.unsubscribe();
  }

  /** @param {Row[]} rows @param {number} seq */
  #onSnapshot(rows, seq) {
    // Keys first, so a row the view cannot key leaves the old rows untouched.
    const keyed = rows.map((row) => /** @type {[string, Row]} */ ([this.keyOf(row), row]));
    this.#held = [];
    this.#rows.clear();
    for (const [key, row] of keyed) this.#rows.set(key, row);
    this.#seq = seq;
    call(this.#handlers.snapshot, rows, seq);
    call(this.#handlers.render, { cause: 'snapshot', seq, transactions: [], changes: [], rows: this.#rows });
  }

  /** @param {number} seq */
  #onSubscribed(seq) {
    // Live from `seq`: with nothing held, the rows are current there (nothing that matches lies in between).
    if (this.#held.length === 0 && this.#seq != null && seq > this.#seq) this.#seq = seq;
    call(this.#handlers.subscribed, seq);
  }

  /** @param {ChangeFrame} frame */
  #onChange(frame) {
    this.#check(frame); // before anything is held: a frame the view cannot apply must not sit among the others
    call(this.#handlers.change, frame);
    if (frame.tx === undefined) {
      // Recorded before the server stamped transactions: it stands alone, after whatever is held.
      this.#flush();
      this.#held.push(frame);
      this.#flush();
      return;
    }
    this.#held.push(frame);
    if (frame.tx_end === true) this.#flush();
  }

  /**
   * Refuse, with a message that says why, a frame the view's rules cannot apply.
   * @param {ChangeFrame} frame
   */
  #check(frame) {
    const where = `LiveView ${this.#table}: change at seq ${frame.seq}`;
    if (!['added', 'modified', 'removed', 'reset'].includes(frame.view)) {
      throw new TypeError(`${where} has view ${JSON.stringify(frame.view)}, not added, modified, removed or reset`);
    }
    if (frame.tx !== undefined && typeof frame.tx !== 'string') {
      throw new TypeError(`${where} has tx ${JSON.stringify(frame.tx)}; a transaction id is a string`);
    }
    if (frame.view === 'reset') return;
    const names = frame.key && typeof frame.key === 'object' ? Object.keys(frame.key) : [];
    if (names.length !== this.#columns.length || !this.#columns.every((column) => names.includes(column))) {
      throw new TypeError(
        `${where} is keyed by [${names.join(', ')}], but the view's key is [${this.#columns.join(', ')}]` +
          ' (pass the table\'s primary key as `key`)',
      );
    }
    if (frame.view !== 'removed' && (!frame.row || typeof frame.row !== 'object')) {
      throw new TypeError(`${where} is ${frame.view} without a row`);
    }
  }

  /** Apply every held frame, then tell `render` once. */
  #flush() {
    if (this.#held.length === 0) return;
    const frames = this.#held;
    this.#held = [];
    const changes = frames.map((frame) => this.#apply(frame));
    const seq = frames[frames.length - 1].seq;
    this.#seq = seq;
    /** @type {string[]} */
    const transactions = [];
    for (const frame of frames) if (frame.tx !== undefined && !transactions.includes(frame.tx)) transactions.push(frame.tx);
    call(this.#handlers.render, { cause: 'transaction', seq, transactions, changes, rows: this.#rows });
  }

  /**
   * @param {ChangeFrame} frame
   * @returns {ViewChange}
   */
  #apply(frame) {
    if (frame.view === 'reset') {
      this.#rows.clear();
      return { view: 'reset', key: null, row: null, previous: null, movedFrom: null, frame };
    }
    const key = this.keyOf(/** @type {Record<string, unknown>} */ (frame.key));
    if (frame.view === 'removed') {
      const previous = this.#rows.get(key) ?? null;
      this.#rows.delete(key);
      return { view: 'removed', key, row: null, previous, movedFrom: null, frame };
    }
    // An UPDATE of the primary key comes under the new key, with `old` under the old one: that one goes first.
    let movedFrom = null;
    const old = frame.old;
    if (old && this.#columns.every((column) => column in old)) {
      const was = this.keyOf(old);
      if (was !== key && this.#rows.delete(was)) movedFrom = was;
    }
    const previous = this.#rows.get(key) ?? null;
    const row = /** @type {Row} */ (frame.row);
    this.#rows.set(key, row);
    return { view: frame.view, key, row, previous, movedFrom, frame };
  }
}

/**
 * Run a caller's callback so that its exception is reported but cannot corrupt the client's bookkeeping.
 * @param {Function | undefined} fn
 * @param {...unknown} args
 */
function call(fn, ...args) {
  if (!fn) return;
  try {
    fn(...args);
  } catch (error) {
    if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
    else setTimeout(() => { throw error; });
  }
}
