/**
 * dom.js: the demo page's small DOM and time helpers, shared by its other modules. Nothing here holds state.
 */

/**
 * The element with this id; the page's markup (index.html) has every id the modules ask for.
 * @param {string} id
 * @returns {HTMLElement}
 */
export const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * Create an element. Text is only ever set through textContent or text nodes, so a name such as
 * `<img src=x onerror=alert(1)>` is displayed literally instead of becoming markup.
 * @param {string} tag
 * @param {Record<string, any>} [props]  `text`, `class`, `testid`, `on<event>`, anything else is an attribute
 * @param {...(Node | string | null | undefined)} children
 */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'text') node.textContent = String(value);
    else if (key === 'class') node.className = value;
    else if (key === 'testid') node.dataset.testid = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/**
 * Run `done` once the element's CSS animation ends, or soon anyway (reduced motion means no animationend).
 * @param {HTMLElement} node @param {() => void} done @param {number} [fallbackMs]
 */
export function afterAnimation(node, done, fallbackMs = 2000) {
  let finished = false;
  const finish = () => {
    if (finished) return;
    finished = true;
    node.removeEventListener('animationend', finish);
    done();
  };
  node.addEventListener('animationend', finish);
  setTimeout(finish, fallbackMs);
}

/**
 * Show or clear an inline error and keep the input's aria-invalid in step.
 * @param {HTMLElement} target
 * @param {HTMLInputElement | null} input
 * @param {string} [message]
 */
export function setError(target, input, message = '') {
  target.textContent = message;
  if (input) {
    if (message) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }
}

/**
 * Parse an ISO timestamp keeping its microseconds as a fraction of a millisecond.
 * @param {unknown} value
 * @returns {number} epoch ms, NaN if unreadable
 */
export function parseTime(value) {
  if (typeof value !== 'string') return NaN;
  const m = /^(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$/i.exec(value);
  if (!m) return Date.parse(value);
  // The server speaks UTC; a missing offset is read as UTC, and "+0000" gets the colon Date.parse wants.
  const offset = !m[4] || m[4].toUpperCase() === 'Z' ? 'Z' : m[4].replace(/^([+-]\d\d)(\d\d)$/, '$1:$2');
  const whole = Date.parse(`${m[1]}T${m[2]}${offset}`);
  return whole + (m[3] ? Number(`0.${m[3]}`) * 1000 : 0);
}

const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' });
// 24-hour clock: the log column is narrow and AM/PM adds nothing to "what just happened".
export const clockFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });

/** Today's timestamps as a bare time, older ones with their date; the full value stays in the tooltip. */
export function formatUpdated(/** @type {number} */ ms) {
  const sameDay = new Date(ms).toDateString() === new Date().toDateString();
  return sameDay ? clockFormat.format(ms) : dateTimeFormat.format(ms);
}

/** Wall-clock now with sub-millisecond precision, comparable with commit timestamps. */
export const now = () => performance.timeOrigin + performance.now();
