"""The Responses API's turns: items, their translation to a chat completion, the response and its stream events."""
