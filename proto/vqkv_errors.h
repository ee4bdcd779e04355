/* vqkv_errors.h -- the protocol's error codes, in one space with the
 * VQKV_E* codes of kernels/vqkv_codec.h (which keep -1 to -99); these start
 * at -100. They travel in Error.code, so a value never changes meaning once
 * released. Kept apart from vqkv_proto.h, which needs the generated
 * protobuf header, so that the installed client header vqkv.h can share
 * them instead of copying them.
 */
#ifndef VQKV_ERRORS_H
#define VQKV_ERRORS_H

enum {
    /* Framing and decoding (proto/frame.h). */
    VQKV_ETOOBIG = -100, /* frame longer than the limit, or unpacks to more memory than allowed */
    VQKV_EMALFORMED = -101, /* bytes are not a valid packed Envelope */
    VQKV_EUNKNOWN = -102,   /* unknown field, enum value or message type, or no message at all */
    VQKV_EFDS = -103,       /* file descriptors sent wrongly: too many, or not with a frame start */
    VQKV_ECLOSED = -104,    /* the peer closed the connection between frames */
    VQKV_ETRUNC = -105,     /* the peer closed the connection inside a frame */
    VQKV_EAGAIN = -106,     /* a non-blocking socket has no more data now; local, never sent */
    /* Requests (sent by the daemon in Error.code). */
    VQKV_EVERSION = -107, /* protocol version not spoken */
    VQKV_EPROTO = -108,   /* request not valid here: before Hello, a reply type, id reused */
    VQKV_EHANDLE = -109,  /* unknown model or region handle */
    VQKV_ELEASE = -110,   /* unknown or expired lease */
    VQKV_ELIMIT = -111,   /* a Welcome limit reached (requests in flight, regions) */
    VQKV_EPERM = -112,    /* peer not allowed to connect or to make this request */
    VQKV_EQUOTA = -113,   /* the tenant's byte quota is used up */
    VQKV_EMAP = -114,     /* region memory could not be opened or mapped */
    /* Blocks (the daemon's store; a Put reports them as PutStatus values). */
    VQKV_EEXIST = -115,    /* the block is stored already (a put is idempotent) */
    VQKV_ENOENT = -116,    /* no such block (evicted, or never put) */
    VQKV_ENOPARENT = -117, /* the block's parent is not stored: its chain broke */
};

#endif
