/* EdgeGuard external watchdog protocol: see egwd_protocol.h and PROTOCOL.md. */
#include "egwd_protocol.h"

#include <string.h>

uint16_t egwd_crc16(const uint8_t *data, size_t len) {
  /* CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor. */
  uint16_t crc = 0xFFFF;
  for (size_t i = 0; i < len; i++) {
    crc ^= (uint16_t)data[i] << 8;
    for (int b = 0; b < 8; b++) crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
  }
  return crc;
}

size_t egwd_cobs_encode(const uint8_t *in, size_t len, uint8_t *out) {
  size_t code_at = 0, o = 1;
  uint8_t code = 1;
  int after_full = 0;
  for (size_t i = 0; i < len; i++) {
    after_full = 0;
    if (in[i] == 0) {
      out[code_at] = code;
      code_at = o++;
      code = 1;
    } else {
      out[o++] = in[i];
      if (++code == 0xFF) {
        out[code_at] = code;
        code_at = o++;
        code = 1;
        after_full = 1;
      }
    }
  }
  if (after_full) return o - 1; /* a full block implies no zero: no trailing code byte */
  out[code_at] = code;
  return o;
}

int egwd_cobs_decode(const uint8_t *in, size_t len, uint8_t *out) {
  size_t i = 0, o = 0;
  while (i < len) {
    uint8_t code = in[i];
    if (code == 0 || i + code > len) return -1;
    for (size_t k = 1; k < code; k++) {
      if (in[i + k] == 0) return -1;
      out[o++] = in[i + k];
    }
    i += code;
    if (code != 0xFF && i < len) out[o++] = 0;
  }
  return (int)o;
}

size_t egwd_encode_frame(const uint8_t *payload, size_t len, uint8_t *out) {
  uint8_t raw[EGWD_MAX_PAYLOAD + 2];
  if (len > EGWD_MAX_PAYLOAD) return 0;
  memcpy(raw, payload, len);
  uint16_t crc = egwd_crc16(payload, len);
  raw[len] = (uint8_t)(crc >> 8);
  raw[len + 1] = (uint8_t)crc;
  out[0] = 0;
  size_t n = egwd_cobs_encode(raw, len + 2, out + 1);
  out[n + 1] = 0;
  return n + 2;
}

void egwd_rx_init(egwd_rx_t *rx) { memset(rx, 0, sizeof *rx); }

size_t egwd_rx_feed(egwd_rx_t *rx, uint8_t byte) {
  if (byte != 0) {
    if (rx->skipping) return 0;
    if (rx->n >= EGWD_MAX_BODY) { /* oversize: drop up to the next delimiter */
      rx->n = 0;
      rx->skipping = 1;
      rx->bad_frames++;
      return 0;
    }
    rx->body[rx->n++] = byte;
    return 0;
  }
  rx->skipping = 0;
  if (rx->n == 0) return 0; /* idle / resync delimiters */
  int len = egwd_cobs_decode(rx->body, rx->n, rx->payload);
  rx->n = 0;
  if (len < 3) { rx->bad_frames++; return 0; }
  uint16_t crc = (uint16_t)((rx->payload[len - 2] << 8) | rx->payload[len - 1]);
  if (egwd_crc16(rx->payload, (size_t)len - 2) != crc) { rx->bad_frames++; return 0; }
  return (size_t)len - 2;
}

static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (uint8_t)v; }
static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static uint32_t get32(const uint8_t *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static size_t nak(uint8_t *reply, uint8_t code) { reply[0] = EGWD_NAK; reply[1] = code; return 2; }

size_t egwd_handle(egwd_state_t *st, const uint8_t *msg, size_t len, uint32_t now_ms, uint8_t *reply) {
  if (len == 0) return 0;
  switch (msg[0]) {
    case EGWD_HELLO:
      if (len != 6) return nak(reply, EGWD_NAK_LENGTH);
      if (msg[1] != EGWD_PROTOCOL_VERSION) return nak(reply, EGWD_NAK_VERSION);
      st->timeout_ms = get32(msg + 2);
      if (st->timeout_ms < 1000) st->timeout_ms = 1000; /* never arm shorter than a second */
      st->armed = 1;
      st->last_kick_ms = now_ms;
      st->last_seq = 0;
      reply[0] = EGWD_HELLO_ACK; reply[1] = EGWD_PROTOCOL_VERSION;
      put32(reply + 2, st->timeout_ms); put16(reply + 6, st->boot_count); reply[8] = st->last_cause;
      return 9;
    case EGWD_KICK: {
      if (len != 5) return nak(reply, EGWD_NAK_LENGTH);
      uint32_t seq = get32(msg + 1);
      /* Strictly increasing: a host stuck replaying an old frame does not keep the board alive. */
      if (!st->armed || seq <= st->last_seq) return nak(reply, EGWD_NAK_STALE_SEQ);
      st->last_seq = seq;
      st->last_kick_ms = now_ms;
      reply[0] = EGWD_KICK_ACK; put32(reply + 1, seq);
      return 5;
    }
    case EGWD_STATUS:
      if (len != 1) return nak(reply, EGWD_NAK_LENGTH);
      reply[0] = EGWD_STATUS_REPLY; reply[1] = (uint8_t)st->armed;
      put32(reply + 2, st->timeout_ms); put32(reply + 6, now_ms - st->last_kick_ms);
      put16(reply + 10, st->resets); put32(reply + 12, st->last_seq);
      return 16;
    case EGWD_DISARM:
      if (len != 5 || memcmp(msg + 1, "STOP", 4) != 0) return nak(reply, EGWD_NAK_LENGTH);
      st->armed = 0;
      reply[0] = EGWD_DISARM_ACK;
      return 1;
    default:
      return nak(reply, EGWD_NAK_UNKNOWN);
  }
}

int egwd_expired(egwd_state_t *st, uint32_t now_ms) {
  /* Unsigned subtraction handles the millis() wrap-around after 49.7 days. */
  if (st->armed && (uint32_t)(now_ms - st->last_kick_ms) > st->timeout_ms) {
    st->armed = 0;
    st->resets++;
    return 1;
  }
  return 0;
}
