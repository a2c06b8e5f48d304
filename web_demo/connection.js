/**
 * connection.js: the header's connection state and the event log's account of it: every status change, every
 * closed socket and every error the client reports.
 */
import { $ } from './dom.js';
import { logNote } from './event-log.js';

const SAID = {
  connecting: 'Connecting…',
  live: 'Connected: changes stream live.',
  reconnecting: 'Connection lost; reconnecting…',
  offline: 'Offline. The stream resumes where it stopped once the network is back.',
  unauthorized: 'The server wants a valid token and stopped trying; enter one above.',
};

/**
 * @param {import('./realtime.js').RealtimeClient} rt
 * @param {() => void} onStatus  called after each status change (a lost connection makes the table's
 *                               subscription pending until it is sent again)
 */
export function wireConnection(rt, onStatus) {
  const status = $('status');
  rt.on('status', (state) => {
    status.textContent = state;
    status.dataset.state = state;
    document.body.dataset.connection = state;
    onStatus();
    logNote(SAID[state], state === 'live' ? 'info' : state === 'unauthorized' ? 'error' : 'warn');
  });
  rt.on('disconnect', ({ code, reason }) => {
    logNote(`Socket closed (${code}${reason ? `: ${reason}` : ''}); the stream resumes from its last seq.`, 'warn');
  });
  rt.on('error', (err) => {
    logNote(`${err.code}: ${err.message}`, 'error');
  });
}
