// The device API, same origin only (the Content-Security-Policy allows nothing else).

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `The relay answered ${status}.`);
    this.status = status;
    this.code = problem.code || "error";
    this.problem = problem;
  }
}

export class Offline extends Error {
  constructor() {
    super("You are offline, or the relay cannot be reached. Trying again…");
    this.code = "offline";
  }
}

export async function call(method, path, { token, body, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Offline();
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}
