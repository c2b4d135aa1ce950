/*
 * edgernn_frame.h - build edgernn binary wire frames on a microcontroller.
 *
 * Header-only, C99, no malloc, no global state. Every builder writes one
 * complete frame into a caller buffer: the raw frame (little-endian header,
 * payload, CRC-16/CCITT-FALSE big-endian), COBS-encoded, then one 0x00
 * delimiter. It returns the number of bytes written, or 0 when an argument
 * is out of range or the buffer is too small. Send those bytes unchanged.
 *
 * The layout is described in docs/wire-protocol.md; the Python decoder is
 * device/edgernnd/binary_codec.py. float is assumed to be IEEE-754 binary32,
 * which holds on every ARM, AVR, ESP32 and RISC-V toolchain in common use.
 *
 * Usage:
 *     uint8_t buf[EDGERNN_FRAME_MAX_BYTES];
 *     float v[3] = {1.5f, -2.25f, 1000.0f};
 *     size_t len = edgernn_build_float32_frame(buf, sizeof buf, 0, seq++,
 *                                              millis(), v, 3);
 *     if (len) uart_write(buf, len);
 */
#ifndef EDGERNN_FRAME_H
#define EDGERNN_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EDGERNN_PROTOCOL_VERSION 1u
#define EDGERNN_MAX_CHANNELS 64u
#define EDGERNN_HEADER_BYTES 11u
#define EDGERNN_CRC_BYTES 2u

#define EDGERNN_PAYLOAD_RESET 0u
#define EDGERNN_PAYLOAD_FLOAT32 1u
#define EDGERNN_PAYLOAD_INT16 2u

/* Longest raw frame: 64 float32 values. */
#define EDGERNN_RAW_MAX_BYTES \
    (EDGERNN_HEADER_BYTES + 4u * EDGERNN_MAX_CHANNELS + EDGERNN_CRC_BYTES)
/* COBS adds one code byte per started 254-byte block; then the delimiter. */
#define EDGERNN_COBS_MAX_BYTES(raw_len) ((raw_len) + (raw_len) / 254u + 1u)
/* A buffer of this size holds any frame. */
#define EDGERNN_FRAME_MAX_BYTES (EDGERNN_COBS_MAX_BYTES(EDGERNN_RAW_MAX_BYTES) + 1u)

/* C99 has no static_assert: a negative array size stops the build instead. */
typedef char edgernn_float_is_32_bits[(sizeof(float) == 4) ? 1 : -1];

/*
 * CRC-16/CCITT-FALSE: poly 0x1021, no reflection, xorout 0. Start with
 * crc = 0xFFFF; pass the result back in to continue over another piece.
 * Bitwise rather than a 512-byte table, to spare flash on small parts.
 */
static inline uint16_t edgernn_crc16(const uint8_t *data, size_t len,
                                     uint16_t crc)
{
    size_t i;
    int bit;
    for (i = 0; i < len; i++) {
        crc ^= (uint16_t)((uint16_t)data[i] << 8);
        for (bit = 0; bit < 8; bit++) {
            crc = (crc & 0x8000u) ? (uint16_t)((crc << 1) ^ 0x1021u)
                                  : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

/*
 * COBS-encodes in[0..len) into out, which must hold
 * EDGERNN_COBS_MAX_BYTES(len) bytes and must not overlap in. The result has
 * no zero byte; no delimiter is written. Returns the encoded length.
 */
static inline size_t edgernn_cobs_encode(const uint8_t *in, size_t len,
                                         uint8_t *out)
{
    size_t code_at = 0; /* where the current block's code byte goes */
    size_t o = 1;
    uint8_t code = 1; /* 1 + bytes in the current block */
    size_t i;
    for (i = 0; i < len; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        } else {
            out[o++] = in[i];
            code++;
            if (code == 0xFF) { /* full block: no zero implied after it */
                out[code_at] = code;
                code_at = o++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return o;
}

static inline void edgernn_put_u16le_(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)(v >> 8);
}

static inline void edgernn_put_u32le_(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)((v >> 8) & 0xFFu);
    p[2] = (uint8_t)((v >> 16) & 0xFFu);
    p[3] = (uint8_t)(v >> 24);
}

/* Writes the 11-byte header; returns its length. */
static inline size_t edgernn_put_header_(uint8_t *raw, uint8_t payload_type,
                                         uint16_t stream_id, uint16_t seq,
                                         uint32_t sensor_time_ms,
                                         uint8_t channels)
{
    raw[0] = (uint8_t)EDGERNN_PROTOCOL_VERSION;
    raw[1] = payload_type;
    edgernn_put_u16le_(raw + 2, stream_id);
    edgernn_put_u16le_(raw + 4, seq);
    edgernn_put_u32le_(raw + 6, sensor_time_ms);
    raw[10] = channels;
    return EDGERNN_HEADER_BYTES;
}

/* Appends the CRC, COBS-encodes raw into out and adds the delimiter. */
static inline size_t edgernn_finish_(uint8_t *raw, size_t raw_len,
                                     uint8_t *out, size_t out_size)
{
    uint16_t crc = edgernn_crc16(raw, raw_len, 0xFFFFu);
    size_t len;
    raw[raw_len++] = (uint8_t)(crc >> 8);
    raw[raw_len++] = (uint8_t)(crc & 0xFFu);
    if (out_size < EDGERNN_COBS_MAX_BYTES(raw_len) + 1u) {
        return 0;
    }
    len = edgernn_cobs_encode(raw, raw_len, out);
    out[len++] = 0x00;
    return len;
}

/*
 * A DATA frame of n float32 values (n <= 64). sensor_time_ms is the
 * sender's clock (for example millis()); seq should grow by one per frame
 * of this stream and wraps at 65536. Returns the length written to out, or
 * 0 when n > 64 or out_size is too small (EDGERNN_FRAME_MAX_BYTES always
 * suffices).
 */
static inline size_t edgernn_build_float32_frame(
    uint8_t *out, size_t out_size, uint16_t stream_id, uint16_t seq,
    uint32_t sensor_time_ms, const float *values, uint8_t n)
{
    uint8_t raw[EDGERNN_RAW_MAX_BYTES];
    size_t len;
    uint8_t i;
    uint32_t bits;
    if (n > EDGERNN_MAX_CHANNELS) {
        return 0;
    }
    len = edgernn_put_header_(raw, EDGERNN_PAYLOAD_FLOAT32, stream_id, seq,
                              sensor_time_ms, n);
    for (i = 0; i < n; i++) {
        /* memcpy is the defined way to read a float's bits; the shifts in
         * put_u32le make the byte order little-endian on any CPU. */
        memcpy(&bits, &values[i], sizeof bits);
        edgernn_put_u32le_(raw + len, bits);
        len += 4;
    }
    return edgernn_finish_(raw, len, out, out_size);
}

/*
 * A DATA frame of n values sent as value_i = mantissas[i] * 2^exponents[i]
 * (n <= 64): 3 bytes per value instead of 4. Choose each exponent so that
 * |mantissa| <= 32767 keeps the precision you need, typically a fixed one
 * per sensor (an ADC count with exponent 0, milli-g with exponent -10).
 * Returns the length written, or 0 as for the float32 builder.
 */
static inline size_t edgernn_build_int16_frame(
    uint8_t *out, size_t out_size, uint16_t stream_id, uint16_t seq,
    uint32_t sensor_time_ms, const int8_t *exponents,
    const int16_t *mantissas, uint8_t n)
{
    uint8_t raw[EDGERNN_RAW_MAX_BYTES];
    size_t len;
    uint8_t i;
    if (n > EDGERNN_MAX_CHANNELS) {
        return 0;
    }
    len = edgernn_put_header_(raw, EDGERNN_PAYLOAD_INT16, stream_id, seq,
                              sensor_time_ms, n);
    for (i = 0; i < n; i++) {
        raw[len++] = (uint8_t)exponents[i];
    }
    for (i = 0; i < n; i++) {
        edgernn_put_u16le_(raw + len, (uint16_t)mantissas[i]);
        len += 2;
    }
    return edgernn_finish_(raw, len, out, out_size);
}

/*
 * A RESET frame: the stream starts a new recording, so the daemon clears
 * its recurrent state. Send it at boot and whenever the sensor restarts.
 * Returns the length written (at most 15), or 0 when out_size is too small.
 */
static inline size_t edgernn_build_reset_frame(uint8_t *out, size_t out_size,
                                               uint16_t stream_id,
                                               uint16_t seq,
                                               uint32_t sensor_time_ms)
{
    uint8_t raw[EDGERNN_HEADER_BYTES + EDGERNN_CRC_BYTES];
    size_t len = edgernn_put_header_(raw, EDGERNN_PAYLOAD_RESET, stream_id,
                                     seq, sensor_time_ms, 0);
    return edgernn_finish_(raw, len, out, out_size);
}

#endif /* EDGERNN_FRAME_H */
