/**
 * create-form.js: the "Add a user" form. It only POSTs: the new row reaches the table through the change stream,
 * like anyone else's. Field errors (422) show next to their inputs, a taken email (409) next to the email.
 */
import { $, setError } from './dom.js';
import { describe, fieldErrors, request } from './rest.js';

export function wireCreateForm() {
  const form = /** @type {HTMLFormElement} */ ($('create-form'));
  const name = /** @type {HTMLInputElement} */ ($('create-name'));
  const email = /** @type {HTMLInputElement} */ ($('create-email'));
  const submit = /** @type {HTMLButtonElement} */ (form.querySelector('[type="submit"]'));
  const errorName = $('error-name');
  const errorEmail = $('error-email');
  const errorForm = $('error-form');
  const status = $('create-status');
  let busy = false;

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (busy) return;
    busy = true;
    submit.setAttribute('aria-busy', 'true');
    setError(errorName, name);
    setError(errorEmail, email);
    setError(errorForm, null);
    status.textContent = '';
    const result = await request('POST', '/users', { body: { name: name.value, email: email.value.trim() } });
    busy = false;
    submit.removeAttribute('aria-busy');
    if (result.ok) {
      status.textContent = `Added user ${result.data.id}. It reached the table through the stream.`;
      form.reset();
      name.focus();
      return;
    }
    const { problem } = result;
    if (result.status === 422) {
      const { byField, other } = fieldErrors(problem, ['name', 'email']);
      setError(errorName, name, byField.name);
      setError(errorEmail, email, byField.email);
      if (other.length || (!byField.name && !byField.email)) setError(errorForm, null, other.join(' ') || describe(problem));
      (byField.name ? name : byField.email ? email : submit).focus();
    } else if (result.status === 409) {
      setError(errorEmail, email, describe(problem));
      email.focus();
    } else {
      setError(errorForm, null, describe(problem));
    }
  });
}

