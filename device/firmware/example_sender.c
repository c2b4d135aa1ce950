/*
 * example_sender.c - writes a few edgernn binary frames to stdout.
 *
 * What a sensor's firmware does, minus the sensor: one reset frame at boot,
 * then one data frame per sample. On a microcontroller, replace fwrite with
 * the UART driver's write and the fixed times with millis().
 *
 *     gcc -std=c99 -Wall -Wextra -O2 -o example_sender example_sender.c
 *     ./example_sender > frames.bin
 *
 * tests/test_binary_codec.py builds and runs it and checks that its output
 * equals the Python encoder's bytes for the same frames.
 */
#include <stdio.h>

#include "edgernn_frame.h"

static int send(const uint8_t *frame, size_t len)
{
    return len != 0 && fwrite(frame, 1, len, stdout) == len;
}

int main(void)
{
    /* Six channels: a 3-axis accelerometer (g) and gyroscope (deg/s). */
    static const float samples[3][6] = {
        {0.01f, -0.02f, 0.98f, 1.5f, -0.25f, 0.0f},
        {0.03f, -0.01f, 1.02f, 2.0f, -0.5f, 0.125f},
        {-1.0e-3f, 4.5f, -9.81f, 250.0f, -1000.0f, 3.0e38f},
    };
    /* The same kind of data as integers: 1.5 = 24576 * 2^-14 and so on. */
    static const int8_t exponents[3] = {-14, -13, -5};
    static const int16_t mantissas[3] = {24576, -18432, 32000};

    uint8_t buf[EDGERNN_FRAME_MAX_BYTES];
    uint16_t seq = 0;
    uint32_t time_ms = 1000;
    int ok = 1;
    int i;

    ok &= send(buf, edgernn_build_reset_frame(buf, sizeof buf, 0, seq++, time_ms));
    for (i = 0; i < 3; i++) {
        time_ms += 20;
        ok &= send(buf, edgernn_build_float32_frame(buf, sizeof buf, 0, seq++,
                                                    time_ms, samples[i], 6));
    }
    ok &= send(buf, edgernn_build_int16_frame(buf, sizeof buf, 7, 65535,
                                              4294967295u, exponents,
                                              mantissas, 3));
    /* A buffer that is too small is refused, not overrun. */
    ok &= edgernn_build_float32_frame(buf, 10, 0, 0, 0, samples[0], 6) == 0;

    if (fflush(stdout) != 0) {
        ok = 0;
    }
    return ok ? 0 : 1;
}
