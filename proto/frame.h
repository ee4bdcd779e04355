/* frame.h -- the framing vqkvd and libvqkv share on the Unix socket.
 *
 * A frame is a u32 little-endian length followed by that many bytes of a
 * packed Envelope (vqkv.proto). File descriptors travel with the frame's
 * first byte as one SCM_RIGHTS message, at most VQKV_FRAME_MAX_FDS of them.
 * A sender must send a frame that carries fds with a sendmsg of its own that
 * starts at the frame's first byte and holds no other frame (the fds then
 * sit on the first byte in the kernel's queue); frames without fds may be
 * batched freely. vqkv_frame_send does exactly this.
 *
 * The receiving side is a vqkv_frame_reader_t: an incremental decoder that
 * is handed bytes and fds as they arrive, in chunks of any size (a length
 * split across reads, many frames in one read), and yields whole frames with
 * their fds. It never blocks and never does I/O unless asked to
 * (vqkv_frame_reader_recv), so the daemon's event loop can feed it, and it
 * never allocates more than the configured maximum for one frame (plus a
 * fixed VQKV_FRAME_STAGING_BYTES when it reads the socket itself).
 *
 * Fds are attributed by position: the fds of one read belong to the last
 * frame that starts in it. Under the sender rule above that is the frame
 * they were sent with, because Linux stops a stream read right after the
 * segment that carries fds. Fds arriving with bytes where no frame starts,
 * more than VQKV_FRAME_MAX_FDS for one frame, or with ancillary data cut
 * short are a protocol error (VQKV_EFDS); every fd the reader refuses is
 * closed, so a refused frame leaks nothing.
 *
 * Errors of the reader are sticky: after a refused length (VQKV_ETOOBIG), a
 * fd error or EOF, the stream cannot be trusted, so the reader keeps
 * returning that error and the connection should be closed (after an Error
 * reply with request_id 0, from the daemon). A frame whose bytes do not
 * unpack is not a reader error: the stream is still in step, and the caller
 * decides.
 *
 * Not thread-safe: one reader per connection, used by one thread at a time.
 */
#ifndef VQKV_FRAME_H
#define VQKV_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "vqkv_proto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of the length prefix. */
#define VQKV_FRAME_HEADER_BYTES 4
/* Fds one frame may carry (a region needs one). */
#define VQKV_FRAME_MAX_FDS 4
/* A sane default for the largest packed Envelope: a Put of 8192 blocks
 * with parents is about 600 KiB. */
#define VQKV_FRAME_DEFAULT_MAX (1u << 20)
/* No configured maximum may exceed this: it bounds what one hostile peer
 * can make the daemon allocate per connection. */
#define VQKV_FRAME_LIMIT (64u << 20)
/* Bytes of blocks one Put may make the daemon stage (blocks times their
 * stored size, fp16 while a model calibrates): bounds what one request
 * allocates. libvqkv sends a larger vqkv_put as several Puts. */
#define VQKV_PUT_STAGING_MAX (256u << 20)
/* Bytes the reader reads the socket into between frames; payloads at least
 * this long are read straight into the frame instead. */
#define VQKV_FRAME_STAGING_BYTES 16384u
/* Unpacking may allocate at most this many times the packed size, plus
 * VQKV_FRAME_UNPACK_SLACK. Real messages stay under 10x (an empty repeated
 * entry costs about 100 bytes unpacked for 2 on the wire, so hostile ones
 * can reach 100x and are refused). */
#define VQKV_FRAME_UNPACK_FACTOR 32u
#define VQKV_FRAME_UNPACK_SLACK (64u << 10)

/* One received frame. It owns data and the fds: vqkv_frame_clear frees the
 * one and closes the others; a caller keeping an fd copies it out and sets
 * its slot to -1 first. */
typedef struct {
    uint8_t *data; /* len bytes of packed Envelope (malloc'd; NULL when len is 0) */
    size_t len;
    int fds[VQKV_FRAME_MAX_FDS]; /* close-on-exec; -1 past n_fds */
    size_t n_fds;
} vqkv_frame_t;

/* Frees data and closes the fds of slots below n_fds that are not -1;
 * leaves an empty frame. Safe on an empty or zeroed frame. */
void vqkv_frame_clear(vqkv_frame_t *frame);

/* The incremental decoder. Fields are private; embed it (no allocation
 * until the first frame), set it up with vqkv_frame_reader_init. */
typedef struct {
    uint32_t max_frame;
    int error; /* sticky; VQKV_OK while the stream is good */

    /* the frame in progress */
    uint8_t hdr[VQKV_FRAME_HEADER_BYTES];
    uint32_t hdr_got;
    uint8_t *buf;
    uint32_t len, got;
    int fds[VQKV_FRAME_MAX_FDS];
    size_t n_fds;
    int started_in_chunk; /* its first byte came in the current chunk */

    /* the chunk being consumed, borrowed from the caller or staging */
    const uint8_t *chunk;
    size_t chunk_len, chunk_pos;
    int chunk_fds[VQKV_FRAME_MAX_FDS]; /* not yet given to a frame */
    size_t chunk_n_fds;

    uint8_t *staging; /* VQKV_FRAME_STAGING_BYTES, allocated by the first recv */
} vqkv_frame_reader_t;

/* Sets up r to accept frames of at most max_frame payload bytes
 * (1..VQKV_FRAME_LIMIT, else VQKV_EINVAL). Allocates nothing. */
int vqkv_frame_reader_init(vqkv_frame_reader_t *r, uint32_t max_frame);

/* Frees what r holds and closes the fds it has not yielded. */
void vqkv_frame_reader_free(vqkv_frame_reader_t *r);

/* Hands r the next len bytes of the stream and the fds that arrived with
 * them. r takes ownership of the fds at once, whatever it returns (it
 * closes them on any error). The bytes are borrowed, not copied up front:
 * they must stay valid until vqkv_frame_reader_next has returned 0 or an
 * error, or has yielded the frame that ends exactly at their end. Feeding
 * again while fed bytes are left is VQKV_EINVAL (sticky). Returns VQKV_OK
 * or the reader's error. */
int vqkv_frame_reader_feed(vqkv_frame_reader_t *r, const void *data, size_t len, const int *fds,
                           size_t n_fds);

/* Takes the next whole frame out of what was fed: 1 with *out filled (the
 * caller owns it; vqkv_frame_clear), 0 when more bytes are needed (the fed
 * chunk is used up), or a negative error: VQKV_ETOOBIG for a length over
 * the maximum, VQKV_EFDS, VQKV_ENOMEM. *out is written only when 1 is
 * returned. Costs one malloc of the frame's length per frame and a copy of
 * every byte. */
int vqkv_frame_reader_next(vqkv_frame_reader_t *r, vqkv_frame_t *out);

/* Tells r the stream ended. VQKV_ECLOSED when it ended between frames,
 * VQKV_ETRUNC inside one (fds of the unfinished frame are closed); either
 * becomes the sticky error. */
int vqkv_frame_reader_eof(vqkv_frame_reader_t *r);

/* The sticky error, VQKV_OK while the stream is good. */
int vqkv_frame_reader_error(const vqkv_frame_reader_t *r);

/* Reads the socket once (recvmsg, fds close-on-exec, EINTR retried) and
 * feeds what came. Call it once vqkv_frame_reader_next has taken every
 * frame of what was read before (returned 0, or yielded the last one).
 * flags are added to recvmsg's (MSG_DONTWAIT reads a blocking socket
 * without blocking). Returns the bytes read (> 0), VQKV_EAGAIN when the
 * socket has nothing now, VQKV_ECLOSED or VQKV_ETRUNC at end of stream,
 * VQKV_EIO with errno set when recvmsg fails, or the reader's error. */
int vqkv_frame_reader_recv(vqkv_frame_reader_t *r, int sock, int flags);

/* Blocking receive for the client: the next whole frame from sock into
 * *out, reading as often as needed. VQKV_OK, or an error as from
 * vqkv_frame_reader_recv (VQKV_EAGAIN on a non-blocking socket or after
 * SO_RCVTIMEO: nothing is lost, call again). Bytes read past the frame stay
 * in r for the next call. */
int vqkv_frame_recv(int sock, vqkv_frame_reader_t *r, vqkv_frame_t *out);

/* Packs env into a new frame, *out (malloc'd) of *out_len bytes, length
 * prefix included. VQKV_ETOOBIG when the packed Envelope exceeds max_frame
 * (1..VQKV_FRAME_LIMIT), checked before allocating. */
int vqkv_frame_encode(const Vqkv__Envelope *env, uint32_t max_frame, uint8_t **out,
                      size_t *out_len);

/* Sends one encoded frame (buf from vqkv_frame_encode) and n_fds fds with
 * its first byte, all of it, blocking until done: partial writes are
 * resumed, EINTR retried, EAGAIN waited out with poll. The fds stay the
 * caller's. MSG_NOSIGNAL: a closed peer gives VQKV_EIO (errno EPIPE), not
 * SIGPIPE. After VQKV_EIO part of the frame may have gone out, so the
 * connection is out of step and must be closed. VQKV_EINVAL, before
 * anything is sent, for a buffer whose length prefix disagrees with len or
 * more than VQKV_FRAME_MAX_FDS fds. */
int vqkv_frame_send_buf(int sock, const uint8_t *buf, size_t len, const int *fds, size_t n_fds);

/* vqkv_frame_encode then vqkv_frame_send_buf. max_frame is the peer's limit
 * (Welcome.max_frame_bytes; VQKV_FRAME_DEFAULT_MAX before Welcome). */
int vqkv_frame_send(int sock, const Vqkv__Envelope *env, const int *fds, size_t n_fds,
                    uint32_t max_frame);

/* Unpacks len bytes (a frame's data) into a new Envelope, with allocation
 * capped at VQKV_FRAME_UNPACK_FACTOR * len + VQKV_FRAME_UNPACK_SLACK.
 * VQKV_EMALFORMED for bytes that are not an Envelope, VQKV_ETOOBIG when the
 * cap is hit, VQKV_ENOMEM. Never reads past len. Free the result with
 * vqkv_frame_envelope_free. */
int vqkv_frame_unpack(const uint8_t *data, size_t len, Vqkv__Envelope **out);

/* Frees an Envelope from vqkv_frame_unpack (not one built by hand). NULL is
 * fine. */
void vqkv_frame_envelope_free(Vqkv__Envelope *env);

/* Strictness check for an unpacked Envelope: VQKV_EUNKNOWN when it has no
 * body, or it or any message inside holds a field or an enum value this
 * build does not know (vqkv.proto: peers refuse what they would misread).
 * VQKV_OK otherwise. Walks the message once; no allocation. */
int vqkv_frame_check(const Vqkv__Envelope *env);

#ifdef __cplusplus
}
#endif

#endif
