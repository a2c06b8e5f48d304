/**
 * live-table.js: the page's one live view of `users` (realtime.js `LiveView`), the filter form that replaces it,
 * and the `seq` and `table` displays of the header.
 *
 * The view applies whole transactions: its frames are logged as they arrive, and the table is drawn once per
 * snapshot and once per transaction (users-table.js `render`), so an UPDATE of 20 rows in one transaction shows
 * as one step.
 */
import { $, now, setError } from './dom.js';
import { logChange, logNote } from './event-log.js';
import { LiveView } from './realtime.js';
import { clearTable, render, showNotSubscribed } from './users-table.js';

const TABLE = 'users';

/** @type {LiveView | null} */
let view = null;

/** @param {number | null} seq */
function showSeq(seq) {
  $('seq').textContent = seq == null ? '—' : String(seq);
}

/** Show the table subscription's state as the client reports it. */
export function showSubscription() {
  const state = view?.subscription.state ?? 'pending';
  const node = $('subscription');
  node.textContent = state;
  node.dataset.state = state;
}

/**
 * (Re)subscribe the table as a live view, which starts from a snapshot.
 * @param {import('./realtime.js').RealtimeClient} rt
 * @param {import('./realtime.js').Condition | null} filter
 */
export function subscribeTable(rt, filter) {
  view?.close();
  clearTable();
  showSeq(null);
  $('filter-active').textContent = filter
    ? `where ${filter.column} ${filter.op} ${JSON.stringify(filter.value)}`
    : 'all rows';

  const live = new LiveView(rt, { table: TABLE, key: ['id'], filter: filter ? [filter] : undefined }, {
    render(update) {
      render(update);
      // The position the table now shows: a frame of an unfinished transaction moves it only once it is applied.
      showSeq(update.seq);
      if (update.changes.length > 1) {
        logNote(`${update.changes.length} changes of one transaction applied together, up to seq ${update.seq}.`);
      }
    },
    snapshot(rows, seq) {
      logNote(`Snapshot: ${rows.length} ${rows.length === 1 ? 'row' : 'rows'} at seq ${seq}.`);
    },
    subscribed(seq) {
      showSeq(live.seq);
      showSubscription();
      logNote(`Subscribed; live after seq ${seq}.`);
    },
    change(frame) {
      // Logged as it arrives, with its latency; the table draws it with the rest of its transaction.
      logChange(frame, now());
    },
    reset() {
      logNote('Our resume point expired on the server; reloading the table from a fresh snapshot.', 'warn');
    },
    retry(err, delay) {
      showSubscription();
      // The table keeps what it shows: the retry resumes from the page's position (or asks for the snapshot
      // again if none has arrived yet), so nothing is missed.
      logNote(`The server cannot serve the table right now (${err.message}); asking again in ${(delay / 1000).toFixed(1)} s.`, 'warn');
    },
    error(err) {
      showSubscription();
      showNotSubscribed();
      if (filter) setError($('filter-error'), /** @type {HTMLInputElement} */ ($('filter-value')), `The server refused this filter: ${err.message}`);
      logNote(`Subscription refused (${err.code}): ${err.message}`, 'error');
    },
  });
  view = live;
  showSubscription();
}

/** @param {import('./realtime.js').RealtimeClient} rt */
export function wireFilter(rt) {
  const form = /** @type {HTMLFormElement} */ ($('filter-form'));
  const column = /** @type {HTMLSelectElement} */ ($('filter-column'));
  const op = /** @type {HTMLSelectElement} */ ($('filter-op'));
  const value = /** @type {HTMLInputElement} */ ($('filter-value'));
  const error = $('filter-error');

  // ids compare as numbers on the server, so only whole numbers make sense there.
  const syncInputMode = () => value.setAttribute('inputmode', column.value === 'id' ? 'numeric' : 'text');
  column.addEventListener('change', syncInputMode);
  syncInputMode();

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    setError(error, value);
    const raw = value.value;
    if (raw.trim() === '') {
      setError(error, value, 'Enter a value to compare with.');
      value.focus();
      return;
    }
    let parsed = /** @type {string | number} */ (raw);
    if (column.value === 'id') {
      if (!/^\s*-?\d+\s*$/.test(raw)) {
        setError(error, value, 'id is a whole number.');
        value.focus();
        return;
      }
      parsed = Number(raw);
    }
    subscribeTable(rt, { column: column.value, op: /** @type {any} */ (op.value), value: parsed });
    logNote(`Filter applied: ${column.value} ${op.value} ${JSON.stringify(parsed)}.`);
  });

  $('filter-clear').addEventListener('click', () => {
    form.reset();
    syncInputMode();
    setError(error, value);
    subscribeTable(rt, null);
    logNote('Filter cleared.');
  });
}
