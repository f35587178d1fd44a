/* EdgeGuard external watchdog: wire protocol (framing + messages), portable C99, no allocation.
 * The byte format is specified in PROTOCOL.md; test_vectors.json is shared with the Python host side. */
#ifndef EGWD_PROTOCOL_H
#define EGWD_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EGWD_PROTOCOL_VERSION 1
#define EGWD_MAX_PAYLOAD 32
/* Largest encoded body: payload + 2 CRC bytes + 1 COBS overhead byte (payloads are < 254 bytes). */
#define EGWD_MAX_BODY (EGWD_MAX_PAYLOAD + 3)
#define EGWD_MAX_FRAME (EGWD_MAX_BODY + 2)

enum {
  EGWD_HELLO = 0x01, EGWD_KICK = 0x02, EGWD_STATUS = 0x03, EGWD_DISARM = 0x04,
  EGWD_HELLO_ACK = 0x81, EGWD_KICK_ACK = 0x82, EGWD_STATUS_REPLY = 0x83, EGWD_DISARM_ACK = 0x84,
  EGWD_NAK = 0xEE
};
enum { EGWD_NAK_UNKNOWN = 1, EGWD_NAK_LENGTH = 2, EGWD_NAK_STALE_SEQ = 3, EGWD_NAK_VERSION = 4 };
enum { EGWD_CAUSE_POWER_ON = 0, EGWD_CAUSE_WATCHDOG = 1 };

uint16_t egwd_crc16(const uint8_t *data, size_t len);
size_t egwd_cobs_encode(const uint8_t *in, size_t len, uint8_t *out);
/* Returns the decoded length, or -1 when the body is not valid COBS. */
int egwd_cobs_decode(const uint8_t *in, size_t len, uint8_t *out);
/* Writes 0x00, COBS(payload || crc16_be), 0x00 into out (EGWD_MAX_FRAME bytes); returns the frame length. */
size_t egwd_encode_frame(const uint8_t *payload, size_t len, uint8_t *out);

/* Incremental receiver: feed bytes one by one; returns the payload length when a verified frame completed
 * (payload in rx->payload), 0 otherwise. Garbage, cut frames and bad CRCs are dropped up to the next 0x00. */
typedef struct {
  uint8_t body[EGWD_MAX_BODY];
  uint8_t payload[EGWD_MAX_BODY];
  size_t n;
  int skipping;
  uint32_t bad_frames;
} egwd_rx_t;
void egwd_rx_init(egwd_rx_t *rx);
size_t egwd_rx_feed(egwd_rx_t *rx, uint8_t byte);

/* The watchdog state machine, independent of the board: the sketch passes time and does the reset. */
typedef struct {
  int armed;
  uint32_t timeout_ms;
  uint32_t last_kick_ms;
  uint32_t last_seq;
  uint16_t boot_count;
  uint16_t resets;
  uint8_t last_cause;
} egwd_state_t;
/* Handle one verified request; writes the reply payload into reply (EGWD_MAX_PAYLOAD bytes), returns its
 * length (0 = no reply). */
size_t egwd_handle(egwd_state_t *st, const uint8_t *msg, size_t len, uint32_t now_ms, uint8_t *reply);
/* Call often: returns 1 exactly once when the armed watchdog expired (the sketch then resets the board). */
int egwd_expired(egwd_state_t *st, uint32_t now_ms);

#ifdef __cplusplus
}
#endif
#endif
