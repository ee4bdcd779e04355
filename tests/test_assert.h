/* test_assert.h -- one assertion on a return code for every test: it fails
 * naming the expression and both codes, as numbers and as the strerror
 * function of their interface words them, which a bare assert_int_equal on
 * negative ints does not do.
 *
 * assert_code takes that function and the expression's text (the caller's
 * #expr, so the message shows the expression as written, its macros not
 * expanded); the names the tests use are it for each interface. A name
 * expands to a call of its function only where it is used, so a test
 * includes the header that declares the function it needs (vqkv_codec.h,
 * vqkv_proto.h through frame.h, or vqkv.h) and no other.
 */
#ifndef VQKV_TEST_ASSERT_H
#define VQKV_TEST_ASSERT_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#define assert_code(strerror_fn, text, expr, want)                                                 \
    do {                                                                                           \
        int got_rc_ = (expr);                                                                      \
        int want_rc_ = (want);                                                                     \
        if (got_rc_ != want_rc_) {                                                                 \
            print_error("%s returned %d (%s), expected %d (%s)\n", text, got_rc_,                  \
                        strerror_fn(got_rc_), want_rc_, strerror_fn(want_rc_));                    \
            fail();                                                                                \
        }                                                                                          \
    } while (0)

/* The codec library's codes (vqkv_codec.h). */
#define assert_rc(expr, want) assert_code(vqkv_strerror, #expr, expr, want)
#define assert_ok(expr) assert_rc(expr, VQKV_OK)
/* The protocol's codes (vqkv_proto.h). */
#define assert_prc(expr, want) assert_code(vqkv_proto_strerror, #expr, expr, want)
#define assert_pok(expr) assert_prc(expr, VQKV_OK)
/* libvqkv's codes (vqkv.h). */
#define assert_vqkv(expr, want) assert_code(vqkv_client_strerror, #expr, expr, want)

#endif
