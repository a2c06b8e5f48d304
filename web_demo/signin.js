/**
 * signin.js: who the page streams and writes as. Against a server with a token key the page needs a bearer
 * token: from the URL fragment (`/#token=<JWT>`, taken out of the address bar at once), from the token form, or
 * from "Sign in as", which asks `POST /auth/dev-token` for one (a server signs them only with AUTH_DEV_TOKENS on;
 * otherwise the page says how to mint one with `realtime token`). The token is held in rest.js, in this tab's
 * memory only. Once the server accepts it, the header shows who it says the page is, with "Sign out".
 */
import { $, h, setError } from './dom.js';
import { currentToken, describe, holdToken, request } from './rest.js';

/**
 * The bearer token from `#token=...`, taken out of the address bar (and so out of bookmarks and screenshots)
 * before anything else runs. Null: none given, the page works as against an open server.
 * @returns {string | null}
 */
export function takeTokenFromFragment() {
  const match = /^#(?:.*&)?token=([^&]*)/.exec(location.hash);
  if (!match) return null;
  history.replaceState(history.state, '', location.pathname + location.search);
  try {
    return decodeURIComponent(match[1]) || null;
  } catch {
    return match[1] || null;
  }
}

/**
 * Start over with `value` as this page's token: a fresh page, so that a table read as someone else is never
 * shown to (or resumed for) the new identity. The fragment is taken straight out of the address bar again.
 * @param {string} value
 */
function startWithToken(value) {
  location.hash = `token=${encodeURIComponent(value)}`;
  location.reload();
}

/**
 * The token form, shown while the client is `unauthorized`.
 * @param {import('./realtime.js').RealtimeClient} rt
 */
export function wireToken(rt) {
  const form = /** @type {HTMLFormElement} */ ($('token-form'));
  const input = /** @type {HTMLInputElement} */ ($('token-input'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) {
      input.focus();
      return;
    }
    if (currentToken()) {
      // The client already asks us for tokens: the next attempt gets this one.
      holdToken(value);
      form.reset();
      rt.connect();
      return;
    }
    // This page started without a token, so its client sends none.
    startWithToken(value);
  });
}

/** "Sign in as": a development token from the server when it signs them, else how to mint one. */
export function wireSignIn() {
  const form = /** @type {HTMLFormElement} */ ($('signin-form'));
  const sub = /** @type {HTMLInputElement} */ ($('signin-sub'));
  const role = /** @type {HTMLSelectElement} */ ($('signin-role'));
  const submit = /** @type {HTMLButtonElement} */ (form.querySelector('[type="submit"]'));
  const message = $('signin-message');
  let busy = false;

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (busy) return;
    setError(message, sub);
    const who = sub.value.trim();
    if (!who) {
      setError(message, sub, 'Enter the id of the user to sign in as.');
      sub.focus();
      return;
    }
    busy = true;
    submit.setAttribute('aria-busy', 'true');
    const result = await request('POST', '/auth/dev-token', { body: { sub: who, role: role.value } });
    busy = false;
    submit.removeAttribute('aria-busy');
    if (result.ok) {
      startWithToken(result.data.token);
      return;
    }
    if (result.status === 404 || result.status === 405) {
      // No such route: AUTH_DEV_TOKENS is off, as it is everywhere but a developer's machine.
      message.replaceChildren(
        'This server does not sign development tokens (AUTH_DEV_TOKENS is off). Where it runs, mint one with ',
        h('code', { text: `realtime token --sub ${who} --role ${role.value}` }),
        ' and paste it below.',
      );
      $('token-input').focus();
      return;
    }
    setError(message, result.status === 422 ? sub : null, describe(result.problem));
  });
}

/**
 * Who the server says the page is, and "Sign out".
 * @param {import('./realtime.js').RealtimeClient} rt
 */
export function wireIdentity(rt) {
  rt.on('status', (state) => {
    $('token-panel').hidden = state !== 'unauthorized';
    if (state === 'unauthorized') $('identity-box').hidden = true; // the server no longer takes that identity
  });
  rt.on('error', (err) => {
    if (err.code === 'unauthorized' || err.code === 'forbidden') $('token-message').textContent = err.message;
  });
  rt.on('authenticated', ({ sub, role }) => {
    // An open server answers `auth` with no identity: there is nobody to show.
    $('identity-box').hidden = sub == null;
    $('identity').textContent = role ? `${sub} · ${role}` : String(sub);
  });
  // The token lives only in this tab's memory (the fragment was taken out of the address bar), so a reload
  // starts the page without one, ready to sign in as someone else.
  $('sign-out').addEventListener('click', () => location.reload());
}
