/* vqkv_proto.c -- names for the protocol's error codes (vqkv_proto.h); the
 * codec codes are named by vqkv_strerror in kernels/, which this defers to,
 * so one call names any code a peer can send.
 */
#include "vqkv_proto.h"

const char *vqkv_proto_strerror(int err)
{
    switch (err) {
    case VQKV_ETOOBIG: return "frame or message exceeds the size limit";
    case VQKV_EMALFORMED: return "bytes are not a valid protocol message";
    case VQKV_EUNKNOWN: return "unknown field, enum value or message type";
    case VQKV_EFDS: return "file descriptors sent wrongly (too many, or not with a frame start)";
    case VQKV_ECLOSED: return "peer closed the connection";
    case VQKV_ETRUNC: return "peer closed the connection in the middle of a frame";
    case VQKV_EAGAIN: return "no data available now (non-blocking socket)";
    case VQKV_EVERSION: return "protocol version not supported";
    case VQKV_EPROTO: return "request not valid at this point of the session";
    case VQKV_EHANDLE: return "unknown model or region handle";
    case VQKV_ELEASE: return "unknown or expired lease";
    case VQKV_ELIMIT: return "a session limit was reached";
    case VQKV_EPERM: return "not permitted";
    case VQKV_EQUOTA: return "tenant quota exceeded";
    case VQKV_EMAP: return "region memory could not be opened or mapped";
    case VQKV_EEXIST: return "block already stored";
    case VQKV_ENOENT: return "no such block";
    case VQKV_ENOPARENT: return "the block's parent is not stored";
    default: return vqkv_strerror(err);
    }
}
