/* Host-side check of the firmware's protocol code against test_vectors.json (hex lines extracted by the
 * Python test, which compiles this with the system C compiler when one exists). Reads lines
 * "crc <hex> <crc>", "cobs <raw hex> <encoded hex>", "frame <payload hex> <frame hex>" on stdin. */
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "egwd_protocol.h"

static size_t unhex(const char *s, uint8_t *out) {
  size_t n = 0;
  if (strcmp(s, "-") == 0) return 0;
  for (; s[0] && s[1]; s += 2) {
    unsigned v;
    sscanf(s, "%2x", &v);
    out[n++] = (uint8_t)v;
  }
  return n;
}

int main(void) {
  char kind[16], a[1024], b[1024];
  uint8_t x[600], y[600], z[600];
  int failures = 0, checks = 0;
  while (scanf("%15s %1023s %1023s", kind, a, b) == 3) {
    size_t nx = unhex(a, x), ny = unhex(b, y);
    checks++;
    if (strcmp(kind, "crc") == 0) {
      if (egwd_crc16(x, nx) != (uint16_t)strtoul(b, NULL, 16)) { printf("crc mismatch %s\n", a); failures++; }
    } else if (strcmp(kind, "cobs") == 0) {
      size_t n = egwd_cobs_encode(x, nx, z);
      if (n != ny || memcmp(z, y, n) != 0) { printf("cobs encode mismatch %s\n", a); failures++; }
      int d = egwd_cobs_decode(y, ny, z);
      if (d != (int)nx || memcmp(z, x, nx) != 0) { printf("cobs decode mismatch %s\n", b); failures++; }
    } else if (strcmp(kind, "frame") == 0) {
      size_t n = egwd_encode_frame(x, nx, z);
      if (n != ny || memcmp(z, y, n) != 0) { printf("frame mismatch %s\n", a); failures++; }
      egwd_rx_t rx;
      egwd_rx_init(&rx);
      size_t got = 0;
      /* Garbage first: the receiver must resynchronise at the frame's leading delimiter. */
      const uint8_t noise[] = {0x13, 0x37, 0xFF};
      for (size_t i = 0; i < sizeof noise; i++) egwd_rx_feed(&rx, noise[i]);
      for (size_t i = 0; i < ny; i++) {
        size_t r = egwd_rx_feed(&rx, y[i]);
        if (r) got = r;
      }
      if (nx <= EGWD_MAX_PAYLOAD && (got != nx || memcmp(rx.payload, x, nx) != 0)) {
        printf("frame decode mismatch %s\n", b);
        failures++;
      }
    }
  }
  /* The state machine: HELLO, kicks (stale sequence refused), STATUS, expiry. */
  egwd_state_t st;
  memset(&st, 0, sizeof st);
  st.boot_count = 7;
  st.last_cause = EGWD_CAUSE_WATCHDOG;
  uint8_t r[EGWD_MAX_PAYLOAD];
  const uint8_t hello[] = {0x01, 0x01, 0x00, 0x00, 0x1f, 0x40};
  const uint8_t hello_ack[] = {0x81, 0x01, 0x00, 0x00, 0x1f, 0x40, 0x00, 0x07, 0x01};
  const uint8_t kick1[] = {0x02, 0, 0, 0, 1}, kick1_ack[] = {0x82, 0, 0, 0, 1}, nak_stale[] = {0xEE, 3};
  const uint8_t status[] = {0x03};
  const uint8_t status_reply[] = {0x83, 1, 0, 0, 0x1f, 0x40, 0, 0, 0x04, 0xd2, 0, 0, 0, 0, 0, 1};
  const uint8_t disarm[] = {0x04, 'S', 'T', 'O', 'P'};
  size_t n;
#define EXPECT(call, want)                                                          \
  do {                                                                             \
    checks++;                                                                      \
    n = (call);                                                                    \
    if (n != sizeof(want) || memcmp(r, want, n) != 0) {                            \
      printf("state machine mismatch at %s\n", #call);                             \
      failures++;                                                                  \
    }                                                                              \
  } while (0)
  EXPECT(egwd_handle(&st, hello, sizeof hello, 0, r), hello_ack);
  EXPECT(egwd_handle(&st, kick1, sizeof kick1, 100, r), kick1_ack);
  EXPECT(egwd_handle(&st, kick1, sizeof kick1, 200, r), nak_stale);
  EXPECT(egwd_handle(&st, status, sizeof status, 1334, r), status_reply);
  checks++;
  if (egwd_expired(&st, 8100) || !egwd_expired(&st, 8101) || st.resets != 1 || st.armed) {
    printf("expiry mismatch\n");
    failures++;
  }
  egwd_handle(&st, hello, sizeof hello, 9000, r);
  const uint8_t disarm_ack[] = {0x84};
  EXPECT(egwd_handle(&st, disarm, sizeof disarm, 9100, r), disarm_ack);
  checks++;
  if (egwd_expired(&st, 100000)) { printf("disarmed watchdog expired\n"); failures++; }
  printf("%d checks, %d failures\n", checks, failures);
  return failures != 0;
}
