/**
 * event-log.js: the "Live events" list, newest first and at most LOG_LIMIT entries: every change frame as it
 * arrives (with its commit-to-browser latency) and notes about the connection and the subscription.
 */
import { $, clockFormat, h, parseTime } from './dom.js';

const LOG_LIMIT = 200;

const log = () => $('event-log');

/** @param {HTMLElement} entry */
function pushLog(entry) {
  const list = log();
  list.prepend(entry);
  while (list.childElementCount > LOG_LIMIT) /** @type {Element} */ (list.lastElementChild).remove();
}

/**
 * @param {string} text
 * @param {'info' | 'warn' | 'error'} [kind]
 */
export function logNote(text, kind = 'info') {
  pushLog(h('li', { class: `log-entry log-${kind}`, testid: 'event-log-entry', 'data-kind': kind },
    h('time', { class: 'log-time', text: clockFormat.format(Date.now()) }),
    h('span', { class: 'log-text', text })));
}

/** @param {import('./realtime.js').ChangeFrame} frame @param {number} arrivedAt */
export function logChange(frame, arrivedAt) {
  const row = /** @type {{id?: unknown, name?: unknown}} */ (frame.row ?? frame.old ?? frame.key ?? {});
  const latency = arrivedAt - parseTime(frame.ts);
  const latencyText = Number.isFinite(latency) ? `${Math.round(latency)} ms` : '—';
  pushLog(h('li', {
    class: `log-entry log-change op-${String(frame.op).toLowerCase()}`, testid: 'event-log-entry',
    'data-kind': 'change', 'data-op': frame.op, 'data-seq': frame.seq, 'data-id': row.id,
    'data-latency': Number.isFinite(latency) ? latency.toFixed(1) : null,
  },
  h('time', { class: 'log-time', text: clockFormat.format(arrivedAt) }),
  h('span', { class: 'log-op', text: frame.op }),
  h('span', { class: 'log-seq', text: `seq ${frame.seq}` }),
  h('span', { class: 'log-id', text: `id ${row.id}` }),
  h('span', { class: 'log-latency', title: 'arrival here minus commit time', text: latencyText }),
  h('span', { class: 'log-name', text: row.name ?? '' })));
}

/** The "Clear log" button. */
export function wireLogClear() {
  $('log-clear').addEventListener('click', () => log().replaceChildren());
}
