/* fuzz_redis_spec.c -- the remote tier's address parser (daemon/redis.h),
 * vqkvd_redis_parse, which reads the `remote` key of vqkvd's configuration.
 *
 * Input: a selector byte (bit 0: a password override is given, the next
 * byte its length), then the spec's text (NUL-terminated here; a NUL
 * inside ends it as C would).
 *
 * Invariants: only VQKV_OK or VQKV_EINVAL; a refusal explains itself and
 * never repeats the password (the override's or the spec's own), and a
 * why buffer of a few bytes gets a terminated prefix; an accepted spec is
 * within every documented bound (a unix path or 1..VQKVD_REDIS_SEEDS_MAX
 * addresses, ports 1-65535, non-empty hosts, db 0 for a cluster, no user
 * without a password, the override's password when one was given);
 * parsing twice agrees. Pure: no allocation, no I/O.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "redis.h"

#define FUZZ_SPEC_MAX 4096

static void fuzz__check_spec(const vqkvd_redis_spec_t *sp, const char *override)
{
    FUZZ_CHECK((sp->path[0] != '\0') != (sp->n_addrs > 0), "path xor addresses");
    FUZZ_CHECK(sp->n_addrs <= VQKVD_REDIS_SEEDS_MAX, "%u seeds", (unsigned)sp->n_addrs);
    FUZZ_CHECK(!sp->cluster || (sp->db == 0 && sp->path[0] == '\0'), "cluster db %u",
               (unsigned)sp->db);
    for (uint32_t i = 0; i < sp->n_addrs; i++) {
        FUZZ_CHECK(sp->addrs[i].port >= 1, "port 0");
        FUZZ_CHECK(sp->addrs[i].host[0] != '\0', "empty host");
    }
    FUZZ_CHECK(sp->user[0] == '\0' || sp->password[0] != '\0', "user without a password");
    if (override != NULL)
        FUZZ_CHECK(strcmp(sp->password, override) == 0, "the override's password lost");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    uint8_t sel = data[0];
    data++, size--;
    char override[64] = "";
    bool has_override = (sel & 1) && size > 0;
    if (has_override) {
        size_t n = data[0] % sizeof override;
        data++, size--;
        n = n < size ? n : size;
        memcpy(override, data, n);
        override[n] = '\0';
        data += n, size -= n;
    }
    char spec[FUZZ_SPEC_MAX + 1];
    size = size < FUZZ_SPEC_MAX ? size : FUZZ_SPEC_MAX;
    memcpy(spec, data, size);
    spec[size] = '\0';

    vqkvd_redis_spec_t a, b;
    char why[256], short_why[5];
    const char *ov = has_override ? override : NULL;
    int rc = vqkvd_redis_parse(spec, ov, &a, why, sizeof why);
    FUZZ_CHECK(rc == VQKV_OK || rc == VQKV_EINVAL, "rc %d", rc);
    int again = vqkvd_redis_parse(spec, ov, &b, short_why, sizeof short_why);
    FUZZ_CHECK(again == rc, "%d then %d", rc, again);
    if (rc == VQKV_OK) {
        fuzz__check_spec(&a, has_override && override[0] != '\0' ? override : NULL);
        FUZZ_CHECK(memcmp(&a, &b, sizeof a) == 0, "two parses differ");
        return 0;
    }
    FUZZ_CHECK(why[0] != '\0' && strlen(why) < sizeof why, "no message");
    FUZZ_CHECK(strlen(short_why) < sizeof short_why, "short buffer overrun");
    /* The override again as bytes no message has, unless the spec does. */
    char marker[sizeof override] = "\x01\x02\x01\x02";
    if (has_override && strstr(spec, marker) == NULL) {
        vqkvd_redis_parse(spec, marker, &b, why, sizeof why);
        FUZZ_CHECK(strstr(why, marker) == NULL, "the password in \"%s\"", why);
    }
    return 0;
}
