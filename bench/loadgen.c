/*
 * One load-generator shard: many WebSocket subscribers in one process, one epoll loop, driven over stdin.
 *
 * Why C: a subscriber's work per change frame is a socket read, a frame header and three fields (`seq`,
 * `ts`, maybe the row's `id`). In Python the interpreter around that read cost as much CPU as the server
 * being measured, and on a shared two-core machine that inflated every contender's latency. Here the
 * user-space part is a fraction of a microsecond; what remains is the kernel's socket work.
 *
 *   loadgen HOST PORT PATH KIND FILTER_BASE CONCURRENCY LAT_PATH [TOKENS [FILTER_MODE]]
 *
 * KIND is `realtime` (send a subscribe message, wait for `subscribed`, check every `seq`) or `peer` (live
 * once connected, count and time only). FILTER_BASE is `-`, or the row id of subscriber 0: subscriber i
 * then filters on id FILTER_BASE + i (realtime asks the server to filter, a peer drops other rows itself).
 * TOKENS is `-` or a file of bearer tokens, one per line: a realtime subscriber i first sends
 * {"type":"auth","token":<line i>}, then its subscribe without waiting (the server handles a connection's
 * frames in order). FILTER_MODE is `ask` (the default: the subscribe carries the id filter) or `check` (it
 * does not, the server's row-level policy narrows it; a frame of another row still counts as `unexpected`).
 *
 * Commands, one per stdin line; each gets one JSON line on stdout:
 *   open FIRST COUNT      connect COUNT subscribers numbered FIRST.. (CONCURRENCY at a time)
 *                         -> {"opened","failed","error","live"}
 *   mark                  zero the window's counters
 *   collect QUIET_S DEADLINE_S EXPECTED FRAMES BY_KEY
 *                         wait until every subscriber live at the call has EXPECTED changes (or, with
 *                         BY_KEY = "k:n,k:n,...", n changes of row k), FRAMES change frames arrived per
 *                         subscriber, nothing arrived for QUIET_S, or DEADLINE_S passed; -1 / `-` = unknown.
 *                         Writes (commit time, latency) pairs of native doubles, in seconds, to LAT_PATH
 *                         -> the window's counts
 *   status                -> {"live"}
 *   quit                  close every connection -> {"ok":true}, exit
 *
 * The Sec-WebSocket-Accept header is not verified: the servers are the ones under test, not adversaries.
 * The open-file limit is the harness's, which raises it to the hard limit before starting shards.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, UPGRADING, SUBSCRIBING, LIVE, DEAD };

#define NAP_NS 1000000L               /* between polls while frames flow */
#define MAX_TOKEN 1000                /* a token and its auth frame fit one client frame of send_frame */
#define QUIET_BEFORE_BLOCKING_S 0.05 /* no frame for this long: block in epoll_wait again */

typedef struct {
    int fd;
    long index;
    int has_key;
    long key;
    enum state state;
    int opening; /* counted in the current `open` until it is live or failed */
    double open_started;
    unsigned char *buf; /* bytes of an incomplete handshake reply or frame */
    size_t len, cap;
    unsigned char *msg; /* a fragmented text message being reassembled */
    size_t msg_len, msg_cap;
    int in_msg;
    unsigned char *seen; /* seen[seq - base_seq] == 1 once that change arrived */
    size_t seen_cap;
    long base_seq, last_seq;
    long count; /* deliveries in the current window */
    int in_window; /* live when `collect` began */
} sub_t;

typedef struct {
    long frames, deliveries, duplicates, out_of_order, unexpected, errors;
    double first, last, last_read;
    double *lat;
    size_t lat_len, lat_cap;
    long closes[5000];
} window_t;

static const char *host, *path, *lat_path;
static int port, peer_kind, has_filter, ask_filter = 1, concurrency;
static char **tokens; /* tokens[i]: subscriber i's bearer token, or NULL without TOKENS */
static size_t ntokens;
static long filter_base;
static int ep;
static sub_t **subs;
static size_t nsubs, subs_cap;
static window_t win;
static double cpu_mark, wall_mark;
static uint64_t rng = 0x9E3779B97F4A7C15ULL;

/* the `open` in progress */
static int opening_active;
static long open_first, open_pending_start, open_end, open_in_flight, open_ok, open_failed;
static char open_error[200];

/* the `collect` in progress */
static int collect_active;
static double col_quiet, col_deadline, col_started;
static long col_target, col_target_frames;
static int col_known;
static long *expected_by_index; /* expected changes per subscriber index, or NULL */
static size_t expected_len;
static long col_expected_per_sub;

static double now_wall(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double now_mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_utime.tv_sec + (double)u.ru_utime.tv_usec / 1e6 + (double)u.ru_stime.tv_sec +
           (double)u.ru_stime.tv_usec / 1e6;
}

static uint64_t next_random(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void *grow(void *p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return p;
    size_t n = *cap ? *cap : 256;
    while (n < need) n *= 2;
    void *q = realloc(p, n * item);
    if (!q) {
        perror("realloc");
        exit(1);
    }
    *cap = n;
    return q;
}

static void reply(const char *json) {
    fputs(json, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

/* Only printable ASCII without quotes or backslashes reaches the JSON replies. */
static void set_error(char *dst, size_t size, const char *msg) {
    size_t i = 0;
    for (; msg[i] && i + 1 < size; i++) {
        unsigned char c = (unsigned char)msg[i];
        dst[i] = (c < 32 || c > 126 || c == '"' || c == '\\') ? '?' : (char)c;
    }
    dst[i] = 0;
}

/* ---- sending: client frames are masked (RFC 6455 5.3) ---- */

static void send_all(sub_t *s, const unsigned char *p, size_t n) {
    /* Client frames are a handful of small messages; a full socket buffer here means a dead peer. */
    while (n) {
        ssize_t w = send(s->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

static void send_frame(sub_t *s, int opcode, const unsigned char *payload, size_t n) {
    unsigned char frame[16 + 1024];
    if (n > 1024) n = 1024;
    size_t at = 0;
    frame[at++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        frame[at++] = (unsigned char)(0x80 | n);
    } else {
        frame[at++] = 0x80 | 126;
        frame[at++] = (unsigned char)(n >> 8);
        frame[at++] = (unsigned char)n;
    }
    uint32_t mask = (uint32_t)next_random();
    unsigned char *m = frame + at;
    memcpy(m, &mask, 4);
    at += 4;
    for (size_t i = 0; i < n; i++) frame[at + i] = payload[i] ^ m[i & 3];
    send_all(s, frame, at + n);
}

/* ---- lifecycle ---- */

static void finish_open(sub_t *s, const char *error) {
    if (!s->opening) return;
    s->opening = 0;
    open_in_flight--;
    if (error) {
        open_failed++;
        if (!open_error[0]) set_error(open_error, sizeof open_error, error);
    } else {
        open_ok++;
    }
}

static void kill_sub(sub_t *s, const char *why) {
    if (s->state == DEAD) return;
    s->state = DEAD;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    finish_open(s, why);
}

static void go_live(sub_t *s, long seq) {
    s->state = LIVE;
    s->base_seq = s->last_seq = seq;
    finish_open(s, NULL);
}

static void connect_sub(sub_t *s) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    s->open_started = now_mono();
    s->opening = 1;
    open_in_flight++;
    if (s->fd < 0) {
        s->state = DEAD;
        finish_open(s, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(s->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
    s->state = CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        char why[120];
        snprintf(why, sizeof why, "connect: %s", strerror(errno));
        close(s->fd);
        s->state = DEAD;
        finish_open(s, why);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

static void start_next_opens(void) {
    while (opening_active && open_in_flight < concurrency && open_pending_start < open_end) {
        connect_sub(subs[open_pending_start++]);
    }
}

static void send_handshake(sub_t *s) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char key[25];
    for (int i = 0; i < 22; i++) key[i] = b64[next_random() & 63];
    key[22] = key[23] = '=';
    key[24] = 0;
    char request[512];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port, key);
    send_all(s, (const unsigned char *)request, (size_t)n);
}

static void on_upgraded(sub_t *s) {
    if (peer_kind) {
        go_live(s, 0);
        return;
    }
    char msg[MAX_TOKEN + 64];
    int n;
    if (tokens) {
        if (s->index < 0 || (size_t)s->index >= ntokens) {
            kill_sub(s, "no token for this subscriber in TOKENS");
            return;
        }
        n = snprintf(msg, sizeof msg, "{\"type\":\"auth\",\"token\":\"%s\"}", tokens[s->index]);
        send_frame(s, 0x1, (const unsigned char *)msg, (size_t)n);
    }
    if (s->has_key && ask_filter) {
        n = snprintf(msg, sizeof msg,
                     "{\"type\":\"subscribe\",\"id\":\"b\",\"table\":\"users\","
                     "\"filter\":[{\"column\":\"id\",\"op\":\"eq\",\"value\":%ld}]}",
                     s->key);
    } else {
        n = snprintf(msg, sizeof msg, "{\"type\":\"subscribe\",\"id\":\"b\",\"table\":\"users\"}");
    }
    s->state = SUBSCRIBING;
    send_frame(s, 0x1, (const unsigned char *)msg, (size_t)n);
}

/* ---- reading a change ---- */

static const unsigned char *find(const unsigned char *p, size_t n, const char *needle) {
    return memmem(p, n, needle, strlen(needle));
}

static const unsigned char *find_last(const unsigned char *p, size_t n, const char *needle) {
    size_t k = strlen(needle);
    if (n < k) return NULL;
    for (size_t i = n - k + 1; i-- > 0;) {
        if (p[i] == (unsigned char)needle[0] && memcmp(p + i, needle, k) == 0) return p + i;
    }
    return NULL;
}

/* The integer after `p` (skipping a colon and spaces), or 0 with *ok = 0. */
static long read_long(const unsigned char *p, const unsigned char *end, int *ok) {
    while (p < end && (*p == ':' || *p == ' ')) p++;
    int negative = 0;
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    long value = 0;
    const unsigned char *digits = p;
    while (p < end && *p >= '0' && *p <= '9') value = value * 10 + (*p++ - '0');
    *ok = p > digits;
    return negative ? -value : value;
}

static long days_from_civil(long y, long m, long d) {
    y -= m <= 2;
    long era = (y >= 0 ? y : y - 399) / 400;
    long yoe = y - era * 400;
    long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int digits(const unsigned char *p, int n, long *out) {
    long v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 1;
}

/* ISO 8601 as realtime (`...Z`) and PostgreSQL's JSON (`...+00:00`) write it; no zone means UTC. */
static int parse_ts(const unsigned char *p, size_t n, double *out) {
    long y, mo, d, h, mi, sec;
    if (n < 19 || !digits(p, 4, &y) || !digits(p + 5, 2, &mo) || !digits(p + 8, 2, &d) ||
        !digits(p + 11, 2, &h) || !digits(p + 14, 2, &mi) || !digits(p + 17, 2, &sec))
        return 0;
    double value = (double)(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec);
    size_t at = 19;
    if (at < n && p[at] == '.') {
        double scale = 0.1;
        for (at++; at < n && p[at] >= '0' && p[at] <= '9'; at++, scale /= 10) value += (p[at] - '0') * scale;
    }
    if (at < n && (p[at] == '+' || p[at] == '-') && n - at >= 6) {
        long oh, om;
        if (!digits(p + at + 1, 2, &oh) || !digits(p + at + 4, 2, &om)) return 0;
        double offset = (double)(oh * 3600 + om * 60);
        value += p[at] == '+' ? -offset : offset;
    }
    *out = value;
    return 1;
}

/* Every subscriber receives the same change, so the same `ts` arrives many times in a row. */
static unsigned char ts_cached[64];
static size_t ts_cached_len;
static double ts_cached_value;

static int ts_epoch(const unsigned char *p, size_t n, double *out) {
    if (n == ts_cached_len && memcmp(p, ts_cached, n) == 0) {
        *out = ts_cached_value;
        return 1;
    }
    if (n > sizeof ts_cached || !parse_ts(p, n, out)) return 0;
    memcpy(ts_cached, p, n);
    ts_cached_len = n;
    ts_cached_value = *out;
    return 1;
}

static void on_text(sub_t *s, const unsigned char *p, size_t n, double now) {
    const unsigned char *end = p + n;
    /* Both realtime and the peers' trigger put `ts` last, after the row: search from the end. */
    const unsigned char *ts = find_last(p, n, "\"ts\"");
    int ok;
    if (!ts) {
        /* Not a change: `subscribed`, `error`, `pong`. */
        if (find(p, n, "\"error\"")) {
            win.errors++;
            if (s->opening) {
                char why[200];
                snprintf(why, sizeof why, "%.*s", (int)(n < 190 ? n : 190), (const char *)p);
                kill_sub(s, why);
            }
        } else if (s->state == SUBSCRIBING && find(p, n, "\"subscribed\"")) {
            const unsigned char *seq = find(p, n, "\"seq\"");
            long value = seq ? read_long(seq + 5, end, &ok) : 0;
            go_live(s, seq && ok ? value : 0);
        }
        return;
    }
    if (s->state != LIVE) return;
    win.frames++;
    const unsigned char *open = memchr(ts + 4, '"', (size_t)(end - ts - 4));
    const unsigned char *close = open ? memchr(open + 1, '"', (size_t)(end - open - 1)) : NULL;
    double committed;
    if (!close || !ts_epoch(open + 1, (size_t)(close - open - 1), &committed)) {
        win.errors++;
        return;
    }
    if (s->has_key) {
        const unsigned char *row = find(p, n, "\"row\"");
        const unsigned char *id = row ? find(row, (size_t)(end - row), "\"id\"") : NULL;
        long value = id ? read_long(id + 4, end, &ok) : 0;
        if (!id || !ok || value != s->key) {
            /* Broadcasting peers send every change to everyone; their clients drop what they did not ask
               for. From realtime such a frame is a filtering bug. */
            if (!peer_kind) win.unexpected++;
            return;
        }
    }
    if (!peer_kind) {
        /* Realtime writes `"seq":N,` near the start of every change frame. */
        const unsigned char *at = find(p, n, "\"seq\"");
        long seq = at ? read_long(at + 5, end, &ok) : 0;
        if (!at || !ok) {
            win.errors++;
            return;
        }
        long index = seq - s->base_seq;
        if (index <= 0) {
            /* At or before the `subscribed` position: the protocol promises this never arrives. */
            win.out_of_order++;
            return;
        }
        if ((size_t)index >= s->seen_cap) {
            size_t old = s->seen_cap;
            s->seen = grow(s->seen, &s->seen_cap, (size_t)index + 1, 1);
            memset(s->seen + old, 0, s->seen_cap - old);
        }
        if (s->seen[index]) {
            win.duplicates++;
            return;
        }
        s->seen[index] = 1;
        if (seq < s->last_seq)
            win.out_of_order++;
        else
            s->last_seq = seq;
    }
    s->count++;
    win.deliveries++;
    if (!win.first) win.first = now;
    win.last = now;
    /* The commit time names the change, so the harness can tell its first delivery from the last. */
    win.lat = grow(win.lat, &win.lat_cap, win.lat_len + 2, sizeof(double));
    win.lat[win.lat_len++] = committed;
    win.lat[win.lat_len++] = now - committed;
}

/* ---- reading frames ---- */

/* Handle one frame; returns 0 when the connection is gone. */
static int on_frame(sub_t *s, unsigned char first, const unsigned char *payload, size_t n, double now) {
    int opcode = first & 0x0F, fin = first & 0x80;
    if (opcode == 0x1 && fin) {
        on_text(s, payload, n, now);
    } else if (opcode == 0x1 || (opcode == 0x0 && s->in_msg)) {
        if (opcode == 0x1) s->msg_len = 0;
        s->msg = grow(s->msg, &s->msg_cap, s->msg_len + n, 1);
        memcpy(s->msg + s->msg_len, payload, n);
        s->msg_len += n;
        s->in_msg = !fin;
        if (fin) on_text(s, s->msg, s->msg_len, now);
    } else if (opcode == 0x9) {
        send_frame(s, 0xA, payload, n);
    } else if (opcode == 0x8) {
        int code = n >= 2 ? (payload[0] << 8) | payload[1] : 1005;
        if (code >= 0 && code < 5000) win.closes[code]++;
        send_frame(s, 0x8, payload, n >= 2 ? 2 : 0);
        char why[200];
        snprintf(why, sizeof why, "closed by server with %d %.*s", code, (int)(n > 2 && n < 150 ? n - 2 : 0),
                 (const char *)payload + 2);
        kill_sub(s, why);
        return 0;
    }
    return s->state != DEAD;
}

/* Parse the frames in p[0..n); returns how many bytes were consumed, or -1 when the connection is gone. */
static long parse_frames(sub_t *s, const unsigned char *p, size_t n, double now) {
    size_t at = 0;
    while (n - at >= 2) {
        unsigned char len7 = p[at + 1];
        if (len7 & 0x80) {
            kill_sub(s, "the server sent a masked frame");
            return -1;
        }
        size_t head = 2, length = len7;
        if (len7 == 126) {
            if (n - at < 4) break;
            length = ((size_t)p[at + 2] << 8) | p[at + 3];
            head = 4;
        } else if (len7 == 127) {
            if (n - at < 10) break;
            length = 0;
            for (size_t i = 0; i < 8; i++) length = (length << 8) | p[at + 2 + i];
            head = 10;
        }
        if (length > n - at - head) break;
        if (!on_frame(s, p[at], p + at + head, length, now)) return -1;
        at += head + length;
    }
    return (long)at;
}

static void keep(sub_t *s, const unsigned char *p, size_t n) {
    s->buf = grow(s->buf, &s->cap, n, 1);
    memmove(s->buf, p, n);
    s->len = n;
}

static void on_readable(sub_t *s) {
    static unsigned char scratch[1 << 16];
    static char control[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec io = {.iov_base = scratch, .iov_len = sizeof scratch};
    struct msghdr msg = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t got = recvmsg(s->fd, &msg, 0);
    if (got <= 0) {
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
        kill_sub(s, got == 0 ? "connection closed" : strerror(errno));
        return;
    }
    /* Arrival is when the kernel received the data (SO_TIMESTAMPNS), not when this loop got to it, so napping
       between polls (see main) costs no accuracy. For TCP the stamp is that of the newest segment read: frames
       read together share it. */
    double now = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec stamp;
            memcpy(&stamp, CMSG_DATA(c), sizeof stamp);
            now = (double)stamp.tv_sec + (double)stamp.tv_nsec / 1e9;
        }
    }
    if (now == 0) now = now_wall();
    win.last_read = now;
    const unsigned char *p = scratch;
    size_t n = (size_t)got;
    if (s->len) {
        s->buf = grow(s->buf, &s->cap, s->len + n, 1);
        memcpy(s->buf + s->len, scratch, n);
        p = s->buf;
        n = s->len + n;
    }
    if (s->state == UPGRADING) {
        const unsigned char *blank = memmem(p, n, "\r\n\r\n", 4);
        if (!blank) {
            if (n > 16384) kill_sub(s, "handshake reply too long");
            else keep(s, p, n);
            return;
        }
        if (n < 12 || memcmp(p + 8, " 101", 4) != 0) {
            char why[120];
            size_t line = (size_t)((const unsigned char *)memchr(p, '\r', n) - p);
            snprintf(why, sizeof why, "handshake refused: %.*s", (int)(line < 100 ? line : 100), (const char *)p);
            kill_sub(s, why);
            return;
        }
        size_t consumed = (size_t)(blank + 4 - p);
        p += consumed;
        n -= consumed;
        on_upgraded(s);
    }
    long used = parse_frames(s, p, n, now);
    if (used < 0) return;
    keep(s, p + used, n - (size_t)used);
}

static void on_event(sub_t *s, uint32_t events) {
    if (s->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            char why[120];
            snprintf(why, sizeof why, "connect: %s", strerror(err));
            kill_sub(s, why);
            return;
        }
        if (!(events & EPOLLOUT)) return;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        s->state = UPGRADING;
        send_handshake(s);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(s);
}

/* ---- commands ---- */

static long live_count(void) {
    long live = 0;
    for (size_t i = 0; i < nsubs; i++) live += subs[i]->state == LIVE;
    return live;
}

static void cmd_open(long first, long count) {
    subs = grow(subs, &subs_cap, nsubs + (size_t)count, sizeof *subs);
    open_first = open_pending_start = (long)nsubs;
    for (long i = 0; i < count; i++) {
        sub_t *s = calloc(1, sizeof *s);
        s->index = first + i;
        s->has_key = has_filter;
        s->key = filter_base + first + i;
        s->state = DEAD;
        subs[nsubs++] = s;
    }
    open_end = (long)nsubs;
    open_ok = open_failed = open_in_flight = 0;
    open_error[0] = 0;
    opening_active = 1; /* check_open() starts the connections */
}

/* Called every loop turn while an `open` runs: starts the next connections as earlier ones finish. */
static void check_open(void) {
    static double next_sweep;
    if (!opening_active) return;
    start_next_opens();
    double now = now_mono();
    if (now >= next_sweep) { /* 30 s timeouts: once a second is close enough */
        next_sweep = now + 1;
        for (long i = open_first; i < open_pending_start; i++) {
            sub_t *s = subs[i];
            if (s->opening && now - s->open_started > 30) kill_sub(s, "TimeoutError: no subscription within 30 s");
        }
    }
    if (open_pending_start < open_end || open_in_flight > 0) return;
    opening_active = 0;
    char out[512];
    if (open_error[0])
        snprintf(out, sizeof out, "{\"opened\":%ld,\"failed\":%ld,\"error\":\"%s\",\"live\":%ld}", open_ok,
                 open_failed, open_error, live_count());
    else
        snprintf(out, sizeof out, "{\"opened\":%ld,\"failed\":%ld,\"error\":null,\"live\":%ld}", open_ok,
                 open_failed, live_count());
    reply(out);
}

static void cmd_mark(void) {
    free(win.lat);
    memset(&win, 0, sizeof win);
    for (size_t i = 0; i < nsubs; i++) subs[i]->count = 0;
    cpu_mark = cpu_seconds();
    wall_mark = now_mono();
    reply("{\"ok\":true}");
}

static long expected_for(const sub_t *s) {
    if (expected_by_index) {
        if (!s->has_key || s->index < 0 || (size_t)s->index >= expected_len) return 0;
        return expected_by_index[s->index];
    }
    return col_expected_per_sub > 0 ? col_expected_per_sub : 0;
}

static void cmd_collect(char *args) {
    char *by_key = NULL;
    col_quiet = strtod(strtok_r(args, " ", &args), NULL);
    col_deadline = strtod(strtok_r(NULL, " ", &args), NULL);
    col_expected_per_sub = strtol(strtok_r(NULL, " ", &args), NULL, 10);
    long frames_per_sub = strtol(strtok_r(NULL, " ", &args), NULL, 10);
    by_key = strtok_r(NULL, " \n", &args);
    free(expected_by_index);
    expected_by_index = NULL;
    expected_len = 0;
    if (by_key && strcmp(by_key, "-") != 0) {
        expected_len = (size_t)nsubs + 1;
        for (size_t i = 0; i < nsubs; i++)
            if ((size_t)subs[i]->index >= expected_len) expected_len = (size_t)subs[i]->index + 1;
        expected_by_index = calloc(expected_len, sizeof(long));
        for (char *pair = strtok_r(by_key, ",", &by_key); pair; pair = strtok_r(NULL, ",", &by_key)) {
            long key = strtol(pair, &pair, 10);
            long value = *pair == ':' ? strtol(pair + 1, NULL, 10) : 0;
            long index = key - filter_base;
            if (index >= 0 && (size_t)index < expected_len) expected_by_index[index] = value;
        }
    }
    col_known = col_expected_per_sub >= 0 || expected_by_index != NULL;
    col_target = 0;
    long live = 0;
    for (size_t i = 0; i < nsubs; i++) {
        sub_t *s = subs[i];
        s->in_window = s->state == LIVE;
        if (!s->in_window) continue;
        live++;
        col_target += expected_for(s);
    }
    col_target_frames = (frames_per_sub > 0 ? frames_per_sub : 0) * live;
    col_started = now_mono();
    collect_active = 1;
}

static void check_collect(void) {
    if (!collect_active) return;
    double mono = now_mono(), wall = now_wall();
    double started_wall = wall - (mono - col_started);
    double quiet_since = win.last_read > started_wall ? win.last_read : started_wall;
    int done = (col_known && win.deliveries >= col_target && win.frames >= col_target_frames) ||
               wall - quiet_since >= col_quiet || mono - col_started >= col_deadline;
    if (!done) return;
    collect_active = 0;
    long subscribers = 0, lost = 0;
    for (size_t i = 0; i < nsubs; i++) {
        sub_t *s = subs[i];
        if (!s->in_window) continue;
        subscribers++;
        long missing = expected_for(s) - s->count;
        if (col_known && missing > 0) lost += missing;
    }
    FILE *f = fopen(lat_path, "wb");
    if (f) {
        fwrite(win.lat, sizeof(double), win.lat_len, f);
        fclose(f);
    }
    char closes[2048] = "{";
    size_t at = 1;
    for (int code = 0; code < 5000 && at < sizeof closes - 32; code++) {
        if (win.closes[code])
            at += (size_t)snprintf(closes + at, sizeof closes - at, "%s\"%d\":%ld", at > 1 ? "," : "", code,
                                   win.closes[code]);
    }
    snprintf(closes + at, sizeof closes - at, "}");
    double end = now_mono();
    char out[4096];
    snprintf(out, sizeof out,
             "{\"subscribers\":%ld,\"frames\":%ld,\"deliveries\":%ld,\"duplicates\":%ld,\"out_of_order\":%ld,"
             "\"unexpected\":%ld,\"errors\":%ld,\"lost\":%ld,\"closes\":%s,\"first\":%.6f,\"last\":%.6f,"
             "\"cpu_s\":%.4f,\"wall_s\":%.4f,\"drain_s\":%.4f,\"lat_path\":\"%s\"}",
             subscribers, win.frames, win.deliveries, win.duplicates, win.out_of_order, win.unexpected, win.errors,
             lost, closes, win.first, win.last, cpu_seconds() - cpu_mark, end - wall_mark, end - col_started,
             lat_path);
    reply(out);
}

/* Returns 0 on `quit`. */
static int on_command(char *line) {
    char *rest;
    char *name = strtok_r(line, " \n", &rest);
    if (!name) return 1;
    if (strcmp(name, "open") == 0) {
        long first = strtol(strtok_r(NULL, " ", &rest), NULL, 10);
        long count = strtol(strtok_r(NULL, " \n", &rest), NULL, 10);
        cmd_open(first, count);
    } else if (strcmp(name, "mark") == 0) {
        cmd_mark();
    } else if (strcmp(name, "collect") == 0) {
        cmd_collect(rest);
    } else if (strcmp(name, "status") == 0) {
        char out[64];
        snprintf(out, sizeof out, "{\"live\":%ld}", live_count());
        reply(out);
    } else if (strcmp(name, "quit") == 0) {
        return 0;
    } else {
        reply("{\"error\":\"unknown command\"}");
    }
    return 1;
}

/* One token per line; a JWT is base64url and dots, so it goes into the auth frame's JSON string as is. */
static int load_tokens(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) {
        perror(file);
        return 0;
    }
    char line[MAX_TOKEN + 2];
    size_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        if (line[n] == 0 && !feof(f)) {
            fprintf(stderr, "%s: token %zu is longer than %d bytes\n", file, ntokens, MAX_TOKEN);
            fclose(f);
            return 0;
        }
        line[n] = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = (unsigned char)line[i];
            if (c <= 32 || c > 126 || c == '"' || c == '\\') {
                fprintf(stderr, "%s: token %zu holds a character a JSON string would need escaped\n", file,
                        ntokens);
                fclose(f);
                return 0;
            }
        }
        tokens = grow(tokens, &cap, ntokens + 1, sizeof *tokens);
        tokens[ntokens++] = strdup(line);
    }
    fclose(f);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 8 || argc > 10) {
        fprintf(stderr, "usage: %s HOST PORT PATH KIND FILTER_BASE CONCURRENCY LAT_PATH [TOKENS [FILTER_MODE]]\n",
                argv[0]);
        return 2;
    }
    host = argv[1];
    port = atoi(argv[2]);
    path = argv[3];
    peer_kind = strcmp(argv[4], "peer") == 0;
    has_filter = strcmp(argv[5], "-") != 0;
    filter_base = has_filter ? atol(argv[5]) : 0;
    concurrency = atoi(argv[6]);
    lat_path = argv[7];
    if (argc > 8 && strcmp(argv[8], "-") != 0 && !load_tokens(argv[8])) return 2;
    if (argc > 9) {
        if (strcmp(argv[9], "check") != 0 && strcmp(argv[9], "ask") != 0) {
            fprintf(stderr, "FILTER_MODE must be ask or check, not %s\n", argv[9]);
            return 2;
        }
        ask_filter = strcmp(argv[9], "ask") == 0;
    }
    if (concurrency < 1) concurrency = 1;
    rng ^= (uint64_t)getpid() << 32 ^ (uint64_t)(now_wall() * 1e6);

    ep = epoll_create1(EPOLL_CLOEXEC);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event stdin_ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &stdin_ev);
    cpu_mark = cpu_seconds();
    wall_mark = now_mono();

    char *line = NULL;
    size_t line_len = 0, line_cap = 0;
    struct epoll_event events[512];
    int running = 1;
    double last_busy = 0;
    while (running) {
        /* While frames flow, poll without blocking and nap in between: a process blocked in epoll_wait is woken
           by every frame the server sends, and on loopback that wake-up is paid inside the server's send (about
           a quarter of its CPU in the latency scenario, measured with perf). Napping, this shard is woken once per
           nap instead; timestamps keep arrival times exact. After a quiet spell it blocks again. */
        double mono = now_mono();
        int napping = mono - last_busy < QUIET_BEFORE_BLOCKING_S;
        int timeout = napping ? 0 : (opening_active || collect_active) ? 20 : 1000;
        int n = epoll_wait(ep, events, 512, timeout);
        if (n > 0) last_busy = mono;
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            sub_t *s = events[i].data.ptr;
            if (s) {
                if (s->state != DEAD) on_event(s, events[i].events);
                continue;
            }
            char chunk[65536];
            ssize_t got = read(0, chunk, sizeof chunk);
            if (got == 0) running = 0;
            if (got <= 0) continue;
            line = grow(line, &line_cap, line_len + (size_t)got + 1, 1);
            memcpy(line + line_len, chunk, (size_t)got);
            line_len += (size_t)got;
            char *newline;
            while (running && (newline = memchr(line, '\n', line_len))) {
                *newline = 0;
                size_t used = (size_t)(newline - line) + 1;
                running = on_command(line);
                memmove(line, line + used, line_len - used);
                line_len -= used;
            }
        }
        check_open();
        check_collect();
        if (napping && n < 512) {
            struct timespec nap = {.tv_sec = 0, .tv_nsec = NAP_NS};
            nanosleep(&nap, NULL);
        }
    }
    for (size_t i = 0; i < nsubs; i++)
        if (subs[i]->state != DEAD) close(subs[i]->fd);
    reply("{\"ok\":true}");
    return 0;
}
