/* The hot loop of bench/loadgen.py's `dm --cgen`: paced private messages over
 * connections loadgen.py opened and logged in (their descriptors are inherited).
 *
 *   dmgen RATE WARMUP DURATION WINDOW PAD N  S_FD R_FD TO ... (N triples)
 *
 * Each triple is a sender's descriptor, its receiver's descriptor and the receiver's
 * user name.  RATE sends per second in all (round robin over the senders, a sender
 * with WINDOW sends unanswered skips its turn: "behind"), checked every millisecond,
 * as loadgen.py's pacer does; RATE 0: closed loop, WINDOW in flight per sender, each
 * answer sending the next; each answer read is handled as its lean generator does
 * (a read's last `msg` acknowledged, `ping` answered).  It prints "W0" when the
 * measurement window opens and "W1" when it closes (loadgen.py samples CPU times at
 * each), then one line of figures: delivered sends_acked errors behind
 * in_flight_left and the latencies' p50 p90 p99 max in nanoseconds.
 *
 * Why C: at 50k DMs/s the Python generator costs ~15 us of CPU per DM, ~0.75 of this
 * machine's two cores, which the realm under test then cannot have.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    int sender; /* index of the pair */
    int is_sender;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_cap, out_off;
    long long acked, last_pos;
} conn;

static conn *conns;
static int npairs;
static int *inflight;
static long long delivered, acks, errors, behind;
static int measuring, running = 1, closed_loop;
static int64_t *lat;
static size_t nlat, lat_cap;
static int epfd;
static const char *pad;
static char **to_names;
static long long next_id = 1 << 20;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void reserve(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    *buf = realloc(*buf, c);
    if (!*buf) die("realloc");
    *cap = c;
}

static void want_write(conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void flush(conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                want_write(c, 1);
                return;
            }
            die("send");
        }
        c->out_off += (size_t)n;
    }
    c->out_len = c->out_off = 0;
}

/* Queue one frame (not sent until flush). */
static void frame(conn *c, const char *payload, size_t len) {
    reserve(&c->out, &c->out_cap, c->out_len + len + 4);
    unsigned char *h = (unsigned char *)c->out + c->out_len;
    h[0] = (unsigned char)(len >> 24);
    h[1] = (unsigned char)(len >> 16);
    h[2] = (unsigned char)(len >> 8);
    h[3] = (unsigned char)len;
    memcpy(c->out + c->out_len + 4, payload, len);
    c->out_len += len + 4;
}

static void send_one(int i) {
    conn *c = &conns[2 * i];
    char buf[4096];
    int n = snprintf(buf, sizeof buf, "{\"type\":\"send\",\"to\":\"%s\",\"body\":\"%lld %s\",\"id\":%lld}",
                     to_names[i], (long long)now_ns(), pad, ++next_id);
    inflight[i]++;
    frame(c, buf, (size_t)n); /* written by the caller's flush */
}

static int starts(const char *p, size_t len, const char *prefix) {
    size_t k = strlen(prefix);
    return len >= k && memcmp(p, prefix, k) == 0;
}

static const char MSG[] = "{\"type\":\"msg\",\"pos\":";

static void handle(conn *c, const char *p, size_t len, int64_t now) {
    if (starts(p, len, MSG)) {
        long long pos = strtoll(p + sizeof MSG - 1, NULL, 10);
        if (pos > c->last_pos) c->last_pos = pos;
        if (!c->is_sender && measuring) { /* (a sender's echo is only acknowledged) */
            const char *b = memmem(p, len, "\"body\":\"", 8);
            if (b) {
                long long t = strtoll(b + 8, NULL, 10);
                delivered++;
                if (nlat == lat_cap) {
                    lat_cap = lat_cap ? 2 * lat_cap : 1 << 20;
                    lat = realloc(lat, lat_cap * sizeof *lat);
                    if (!lat) die("realloc");
                }
                lat[nlat++] = now - t;
            }
        }
    } else if (starts(p, len, "{\"type\":\"result\"")) {
        if (c->is_sender) {
            inflight[c->sender]--;
            if (measuring) acks++;
            if (closed_loop && running) send_one(c->sender);
        }
    } else if (starts(p, len, "{\"type\":\"ping\"")) {
        frame(c, "{\"type\":\"pong\"}", 15);
    } else if (starts(p, len, "{\"type\":\"error\"")) {
        errors++;
        if (c->is_sender) inflight[c->sender]--;
        if (errors <= 5) fprintf(stderr, "dmgen: error %.*s\n", (int)(len > 300 ? 300 : len), p);
    }
}

static void on_readable(conn *c) {
    reserve(&c->in, &c->in_cap, c->in_len + 65536);
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        die("recv");
    }
    if (n == 0) {
        fprintf(stderr, "dmgen: the realm closed a connection\n");
        exit(3);
    }
    c->in_len += (size_t)n;
    int64_t now = now_ns();
    size_t off = 0;
    while (c->in_len - off >= 4) {
        unsigned char *h = (unsigned char *)c->in + off;
        size_t len = ((size_t)h[0] << 24) | ((size_t)h[1] << 16) | ((size_t)h[2] << 8) | h[3];
        if (c->in_len - off - 4 < len) break;
        handle(c, c->in + off + 4, len, now);
        off += 4 + len;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    if (c->last_pos > c->acked) {
        char buf[64];
        c->acked = c->last_pos;
        int k = snprintf(buf, sizeof buf, "{\"type\":\"ack\",\"pos\":%lld}", c->acked);
        frame(c, buf, (size_t)k);
    }
    flush(c);
}

static int cmp(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int64_t pct(double q) {
    if (!nlat) return 0;
    size_t k = (size_t)(q / 100.0 * (double)(nlat - 1) + 0.5);
    return lat[k];
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: dmgen RATE WARMUP DURATION WINDOW PAD N S_FD R_FD TO ...\n");
        return 2;
    }
    double rate = atof(argv[1]), warmup = atof(argv[2]), duration = atof(argv[3]);
    int window = atoi(argv[4]);
    pad = argv[5];
    npairs = atoi(argv[6]);
    if (npairs <= 0 || argc != 7 + 3 * npairs) {
        fprintf(stderr, "dmgen: expected %d triples\n", npairs);
        return 2;
    }
    conns = calloc((size_t)(2 * npairs), sizeof *conns);
    inflight = calloc((size_t)npairs, sizeof *inflight);
    to_names = calloc((size_t)npairs, sizeof *to_names);
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    for (int i = 0; i < npairs; i++) {
        to_names[i] = argv[7 + 3 * i + 2];
        for (int k = 0; k < 2; k++) {
            conn *c = &conns[2 * i + k];
            c->fd = atoi(argv[7 + 3 * i + k]);
            c->sender = i;
            c->is_sender = k == 0;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl add");
        }
    }
    int64_t start = now_ns(), w0 = start + (int64_t)(warmup * 1e9),
            w1 = w0 + (int64_t)(duration * 1e9), drain_end = w1 + 15000000000LL;
    long long due_sent = 0, k = 0;
    closed_loop = rate <= 0;
    if (closed_loop)
        for (int i = 0; i < npairs; i++)
            for (int j = 0; j < window; j++) send_one(i);
    for (int i = 0; i < npairs; i++) flush(&conns[2 * i]);
    struct epoll_event evs[256];
    int in_window = 0;
    for (;;) {
        int64_t now = now_ns();
        if (!in_window && now >= w0) {
            in_window = measuring = 1;
            printf("W0\n");
            fflush(stdout);
        }
        if (in_window == 1 && now >= w1) {
            in_window = 2;
            measuring = 0;
            running = 0;
            printf("W1\n");
            fflush(stdout);
        }
        if (running && !closed_loop) {
            long long due = (long long)((double)(now - start) / 1e9 * rate);
            while (due_sent < due) {
                int j = (int)(k++ % npairs);
                due_sent++;
                if (inflight[j] < window) {
                    send_one(j); /* one write per send: as from many clients */
                    flush(&conns[2 * j]);
                } else if (measuring) behind++;
            }
        } else if (!running) {
            long long left = 0;
            for (int i = 0; i < npairs; i++) left += inflight[i];
            if (left <= 0 || now >= drain_end) break;
        }
        int n = epoll_wait(epfd, evs, 256, 1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn *c = evs[i].data.ptr;
            if (evs[i].events & EPOLLOUT) {
                flush(c);
                if (c->out_len == 0) want_write(c, 0);
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
    }
    long long left = 0;
    for (int i = 0; i < npairs; i++) left += inflight[i];
    qsort(lat, nlat, sizeof *lat, cmp);
    printf("%lld %lld %lld %lld %lld %lld %lld %lld %lld\n", delivered, acks, errors, behind, left,
           (long long)pct(50), (long long)pct(90), (long long)pct(99),
           (long long)(nlat ? lat[nlat - 1] : 0));
    return 0;
}
