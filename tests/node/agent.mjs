// An agent written in Node with the official openai package, governed by `aex serve`:
// OPENAI_BASE_URL points at the gateway and the API key is the agent's aex token.
// Prints one JSON line with what it saw, for the test to check.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: process.env.OPENAI_API_KEY, maxRetries: 0 });
const messages = [{ role: "user", content: "hello" }];
const out = {};

const reply = await client.chat.completions.create({ model: "mini", messages });
out.text = reply.choices[0].message.content;
out.usage = reply.usage;

const stream = await client.chat.completions.create({ model: "mini", messages, stream: true, stream_options: { include_usage: true } });
out.streamed = "";
for await (const chunk of stream) {
  if (chunk.choices.length) out.streamed += chunk.choices[0].delta.content ?? "";
}

try {
  await client.chat.completions.create({ model: "nope", messages });
  out.denied = null;
} catch (e) {
  out.denied = { status: e.status, code: e.code };
}
console.log(JSON.stringify(out));
