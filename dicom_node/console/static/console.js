// The console's only script: confirmations for destructive forms, and a reload of pages that show work in progress.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
const seconds = Number(document.body.dataset.refresh || 0);
if (seconds > 0) window.setTimeout(() => window.location.reload(), seconds * 1000);
