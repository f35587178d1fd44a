// EdgeGuard external watchdog firmware for an Arduino-compatible board (RP2040 with the arduino-pico core,
// or an AVR such as a Pro Micro). The host (edgeguard/watchdog/_mcu.py) says HELLO with a timeout, then
// KICKs with increasing sequence numbers while its health checks pass; when kicks stop for the timeout this
// board pulls the host's reset line low (or drops a power relay) for RESET_PULSE_MS. Protocol: PROTOCOL.md.
//
// Wiring: RESET_PIN -> host RUN/RESET pad through an open-drain stage (an NPN or MOSFET), or a relay module
// switching the host's 5 V. STATUS_LED shows armed (on), kicks (blink), reset (fast blink).
#include <Arduino.h>

extern "C" {
#include "egwd_protocol.h"
}

#ifndef RESET_PIN
#define RESET_PIN 15
#endif
#ifndef STATUS_LED
#define STATUS_LED LED_BUILTIN
#endif
#define RESET_PULSE_MS 500
#define POWER_CYCLE_OFF_MS 5000  // used when RESET_ACTIVE_HIGH drives a power relay instead of RESET
#define BOOT_GRACE_MS 120000UL   // after resetting the host, give it this long to say HELLO again

static egwd_rx_t rx;
static egwd_state_t st;
static uint8_t reply[EGWD_MAX_PAYLOAD];
static uint8_t frame[EGWD_MAX_FRAME];

static void pulse_reset() {
  pinMode(RESET_PIN, OUTPUT);
#ifdef RESET_ACTIVE_HIGH
  digitalWrite(RESET_PIN, HIGH);
  delay(POWER_CYCLE_OFF_MS);
  digitalWrite(RESET_PIN, LOW);
#else
  digitalWrite(RESET_PIN, LOW);
  delay(RESET_PULSE_MS);
  pinMode(RESET_PIN, INPUT);  // release: the host's own pull-up takes the line high again
#endif
}

void setup() {
  pinMode(RESET_PIN, INPUT);
  pinMode(STATUS_LED, OUTPUT);
  Serial.begin(115200);
  egwd_rx_init(&rx);
  memset(&st, 0, sizeof st);
  st.boot_count = 1;  // a board with EEPROM/flash may persist this; see PROTOCOL.md
  st.last_cause = EGWD_CAUSE_POWER_ON;
}

void loop() {
  uint32_t now = millis();
  while (Serial.available() > 0) {
    size_t n = egwd_rx_feed(&rx, (uint8_t)Serial.read());
    if (n == 0) continue;
    size_t r = egwd_handle(&st, rx.payload, n, now, reply);
    if (r > 0) {
      size_t f = egwd_encode_frame(reply, r, frame);
      Serial.write(frame, f);
    }
    digitalWrite(STATUS_LED, !digitalRead(STATUS_LED));
  }
  if (egwd_expired(&st, now)) {
    pulse_reset();
    st.last_cause = EGWD_CAUSE_WATCHDOG;
    st.boot_count++;
    delay(10);
  }
  if (!st.armed) digitalWrite(STATUS_LED, (now / 1000) % 2);  // slow blink: waiting for HELLO
}
